"""The backbone: what IAPT needs to know of a Hugging Face decoder, used by every room (model, baselines, engine).

Which families are supported and where their decoder layers live, the text config of multimodal wrappers, the
checks a base must pass, the slot token, and the backbone's own states that anchor soft tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from iapt.config import CONFIG_NAME, IAPTConfig

if TYPE_CHECKING:
    from iapt.baselines.generated import GeneratedPromptConfig

# model_type -> dotted path of the decoder layer list inside the *ForCausalLM model.
SUPPORTED_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gpt2": "transformer.h",
}


def text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """``model.get_input_embeddings()`` of a Hugging Face model (its token embedding: weight (V, d))."""
    # nn.Module types attributes as Tensor | Module: say what a Hugging Face causal LM has (see check_base)
    return cast(nn.Embedding, cast(PreTrainedModel, model).get_input_embeddings())


def find_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The decoder-layer list of ``model``: at ``layers_path`` (dotted) if given, else where its family keeps it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = layers_path or SUPPORTED_LAYER_PATHS.get(model_type or "")
    if path is None:
        raise ValueError(
            f"IAPT does not support model_type={model_type!r} ({type(model).__name__}) yet. Supported decoder-only "
            f"families: {', '.join(sorted(SUPPORTED_LAYER_PATHS))}. For another decoder whose layers take the "
            f"hidden states as first argument, set IAPTConfig(layers_path='model.layers') (the dotted path to "
            f"its layer list)."
        )
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ValueError(
                f"{type(model).__name__} has no layer list at {path!r}: pass the *ForCausalLM model "
                f"(e.g. AutoModelForCausalLM), or set IAPTConfig.layers_path to where its layers live."
            )
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{path!r} of {type(model).__name__} is a {type(module).__name__}, not a layer list")
    return module


def kv_projections(layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The key and value projections of one decoder layer (``insertion='kv'`` writes the slots' outputs of these)."""
    found = {}
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "v_proj") and isinstance(module, nn.Linear):
            if leaf in found:
                raise ValueError(
                    f"{type(layer).__name__} has more than one {leaf}; insertion='kv' cannot tell "
                    "which one its attention uses: use insertion='hidden'"
                )
            found[leaf] = module
    if len(found) != 2:
        raise ValueError(
            f"insertion='kv' needs separate k_proj and v_proj linear layers, which "
            f"{type(layer).__name__} does not have (a fused query/key/value projection?); use "
            "insertion='hidden' (the paper's, which works on every family)"
        )
    return found["k_proj"], found["v_proj"]


def generator_out_features(model: nn.Module, config: Any) -> int:
    """Width of each generator's output: the hidden size (``insertion='hidden'``) or key + value width ('kv')."""
    if getattr(config, "insertion", "hidden") == "hidden":
        return text_config(model).hidden_size
    k, v = kv_projections(find_layers(model, getattr(config, "layers_path", None))[0])
    return k.out_features + v.out_features


def check_base(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"expected a Hugging Face model (PreTrainedModel), got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; IAPT needs a decoder-only causal LM "
            f"({', '.join(sorted(SUPPORTED_LAYER_PATHS))})."
        )
    if not hasattr(model, "generate") or not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"{type(model).__name__} is not a causal LM; load it with AutoModelForCausalLM")


@torch.no_grad()
def slot_states(base_model: PreTrainedModel, token_ids: int | list[int], n: int | None = None) -> torch.Tensor:
    """(layers, n, d) float32: what n tokens alone hold at each decoder layer's input in the bare backbone.

    ``token_ids``: the n ids, or one id repeated ``n`` times. Causal, so the first k of them are also the
    states of the first k tokens: one call serves any n' <= n.
    """
    ids_list = [token_ids] * (n or 1) if isinstance(token_ids, int) else list(token_ids)
    device = input_embeddings(base_model).weight.device
    ids = torch.tensor([ids_list], dtype=torch.long, device=device)
    was_training = base_model.training
    base_model.eval()  # no dropout in a constant
    try:
        out = base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        base_model.train(was_training)
    layers = text_config(base_model).num_hidden_layers
    return torch.stack([h[0].float() for h in out.hidden_states[:layers]])


def slot_token_id(base_model: PreTrainedModel) -> int:
    """The id fed at the slot columns (its embedding is overwritten at every generator layer): the pad id."""
    pad = getattr(text_config(base_model), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def frequent_token_ids(base_model: PreTrainedModel, n: int, generator: torch.Generator | None = None) -> list[int]:
    """n distinct ids drawn from the frequent part of the vocabulary, skipping the special ids.

    Byte-pair vocabularies number their merges in order of frequency, so ids in [V/50, V/5) are common
    words and word pieces (SmolLM2: ids 983-9,830), past the byte alphabet and special tokens at the
    bottom: the same idea as prompt tuning's initialisation from the 5,000 most frequent tokens.
    """
    vocab = input_embeddings(base_model).weight.shape[0]
    text = text_config(base_model)
    special: set[int | None] = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        special.update(value if isinstance(value, list) else [value])
    low, high = vocab // 50, max(vocab // 5, vocab // 50 + n)
    pool = [i for i in range(low, min(high, vocab)) if i not in special]
    if len(pool) < n:
        pool = [i for i in range(vocab) if i not in special]
    order = torch.randperm(len(pool), generator=generator)[:n].tolist()
    return [pool[i] for i in order]


def resolve_anchor(base_model: PreTrainedModel, config: IAPTConfig) -> None:
    """Fill ``config.anchor_token_ids`` for an anchored config that has none (drawn with torch's global RNG)."""
    if config.anchor == "none" or config.anchor_token_ids is not None:
        return
    n = config.num_soft_tokens
    if config.anchor == "pad":
        config.anchor_token_ids = [slot_token_id(base_model)] * n
    else:
        config.anchor_token_ids = frequent_token_ids(base_model, n)


def anchor_states(base_model: PreTrainedModel, config: IAPTConfig) -> torch.Tensor | None:
    """(layers, n, d): what an anchored adapter adds to its generators' output at each layer (None: zero start).

    Derived from the base at load, never saved: the one definition IAPTModel and the serving engine share.
    """
    if config.anchor == "none":
        return None
    resolve_anchor(base_model, config)
    assert config.anchor_token_ids is not None, "resolve_anchor fills anchor_token_ids"
    if getattr(config, "sink_token", False):  # the states the tokens have after the sink column, not at position 0
        return slot_states(base_model, [slot_token_id(base_model), *config.anchor_token_ids])[:, 1:]
    return slot_states(base_model, config.anchor_token_ids)


def output_scales(config: IAPTConfig, anchors: torch.Tensor | None) -> torch.Tensor | None:
    """(layers, n, 1): what the generators' output is multiplied by before the anchor is added
    (``IAPTConfig.output_scale='anchor'``: the RMS of each slot's anchor state), or None (the paper: 1)."""
    if getattr(config, "output_scale", "none") != "anchor" or anchors is None:
        return None
    return anchors.float().square().mean(-1, keepdim=True).sqrt()


def check_compatible(config: IAPTConfig | GeneratedPromptConfig, base_model: PreTrainedModel, directory: Path) -> None:
    text = text_config(base_model)
    base = {
        "architecture (model_type)": base_model.config.model_type,
        "hidden size": text.hidden_size,
        "layer count": text.num_hidden_layers,
    }
    saved = {
        "architecture (model_type)": config.base_model_type,
        "hidden size": config.base_hidden_size,
        "layer count": config.base_num_layers,
    }
    anchor, anchor_ids = getattr(config, "anchor", "none"), getattr(config, "anchor_token_ids", None)
    if anchor == "tokens" and anchor_ids is None:
        raise ValueError(
            f"adapter {directory} is anchored on tokens (anchor='tokens') but records no "
            f"anchor_token_ids; add the ids it was trained with to its {CONFIG_NAME}"
        )
    vocab = input_embeddings(base_model).weight.shape[0]
    if anchor_ids is not None and max(anchor_ids) >= vocab:
        raise ValueError(
            f"adapter {directory} anchors its slots on token ids {anchor_ids}, but this "
            f"base has a vocabulary of {vocab}; load it on the base it was trained on"
        )
    for what, have in base.items():
        want = saved[what]
        if want is not None and want != have:
            raise ValueError(
                f"adapter {directory} was trained on a base with {what} {want!r} "
                f"({config.base_model_name_or_path or 'unknown base'}), but this base model has {what} {have!r} "
                f"({getattr(base_model.config, '_name_or_path', '') or type(base_model).__name__}); "
                f"load it on the base it was trained on"
            )
