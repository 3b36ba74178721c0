"""The method registry: IAPT and every baseline as one entry each (name -> size rule, count, build, load).

The trainer builds, the quality benchmark sizes and ``iapt.adapters`` loads through this module alone, with no
special case for IAPT: its size is the bottleneck r of every generator (one per layer, or per chosen layer),
sized by the same budget rule as the baselines' ranks and prompt lengths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import PreTrainedModel

from iapt.backbone import generator_out_features, text_config
from iapt.baselines import BASELINES
from iapt.config import IAPTConfig
from iapt.generator import generator_parameter_count
from iapt.model import IAPTModel, get_iapt_model
from iapt.options import Method, MethodOptions


def _iapt_config(size: int, options: Any) -> IAPTConfig:
    return IAPTConfig(
        num_soft_tokens=options.num_soft_tokens,
        bottleneck=size,
        activation_init=options.activation_init,
        pooling=options.pooling,
        anchor=options.anchor,
        anchor_token_ids=getattr(options, "anchor_token_ids", None),
        insertion=getattr(options, "insertion", "hidden"),
        output_scale=getattr(options, "output_scale", "none"),
        sink_token=getattr(options, "sink_token", False),
        layers=getattr(options, "layers", None),
    )


def _iapt_count(base: nn.Module, size: int, options: Any) -> int:
    text = text_config(base)
    config = _iapt_config(size, options)
    layers = text.num_hidden_layers if config.layers is None else len(set(config.layers))
    return layers * generator_parameter_count(text.hidden_size, config, generator_out_features(base, config))


# The registry's bases are Hugging Face causal LMs (IAPTModel checks them: check_base).
IAPT = Method(
    "iapt",
    "IAPT",
    "bottleneck",
    lambda options: options.bottleneck,
    _iapt_count,
    lambda base, size, options: get_iapt_model(cast(PreTrainedModel, base), _iapt_config(size, options)),
    lambda base, directory: IAPTModel.from_pretrained(cast(PreTrainedModel, base), directory),
)

METHODS: dict[str, Method] = {m.name: m for m in [IAPT, *BASELINES]}
_BY_PEFT_TYPE = {m.peft_type: m for m in METHODS.values()}


def known_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def _options(options: Any) -> Any:
    return MethodOptions() if options is None else options


def count_for(method: str, base: nn.Module, size: int, options: Any = None) -> int:
    """Exact trainable-parameter count of ``method`` at ``size`` on ``base``."""
    if size < 1:
        raise ValueError(f"{method} size must be >= 1, got {size}")
    return get_method(method).count(base, size, _options(options))


def size_for_budget(method: str, base: nn.Module, budget: int, options: Any = None) -> int:
    """The size (>= 1) whose count is closest to ``budget``; ties go to the smaller size.

    Every count is affine in the size (count = a·size + b), so the best size is next to (budget - b) / a.
    """
    count, options = get_method(method).count, _options(options)
    if budget is None or budget < 1:
        raise ValueError(f"budget must be a positive parameter count, got {budget!r}")
    c1, c2 = count(base, 1, options), count(base, 2, options)
    guess = 1 + (budget - c1) // max(c2 - c1, 1)
    candidates = {max(1, guess + d) for d in (-1, 0, 1, 2)} | {1}
    return min(candidates, key=lambda s: (abs(count(base, s, options) - budget), s))


def size_for(cfg: Any, base: nn.Module) -> int:
    """The size a training run uses: the budget rule, or the method's default without a budget."""
    method = get_method(cfg.method)
    return method.default_size(cfg) if cfg.budget is None else size_for_budget(cfg.method, base, cfg.budget, cfg)


def build(cfg: Any, base: nn.Module) -> nn.Module:
    """Freeze ``base`` and install ``cfg.method`` on it, sized by ``cfg.budget`` or the method's default."""
    return get_method(cfg.method).build(base, size_for(cfg, base), cfg)


def load(base: nn.Module, directory: str | Path, peft_type: str) -> nn.Module:
    """Install the adapter saved in ``directory`` (whose config says ``peft_type``) on ``base``."""
    directory = Path(directory)
    if peft_type not in _BY_PEFT_TYPE:
        raise ValueError(
            f"adapter {directory} is of type {peft_type!r}, which this version cannot load; known "
            f"types: {', '.join(_BY_PEFT_TYPE)}"
        )
    return _BY_PEFT_TYPE[peft_type].load(base, directory)
