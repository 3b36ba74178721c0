"""Baselines of the paper, trained, saved and loaded like IAPT: one registry, method name -> builder + budget rule.

    ============== ======================================== ============================ =====================
    method         what                                     size the budget picks        default size
    ============== ======================================== ============================ =====================
    lora           PEFT LoRA on q_proj, v_proj (GPT-2:       rank r                       8
                   c_attn), alpha = 2r, dropout 0.05
    prompt-tuning  PEFT prompt tuning (input-layer soft      virtual tokens m             20
                   prompt, vocabulary init)
    prefix         PEFT prefix tuning = P-tuning v2 (a key   virtual tokens m             10
                   and value per layer, no reparametrisation;
                   init: the model's own K/V of random tokens)
    idpg           instance-dependent prompt generation:     bottleneck r (m fixed:       cfg.bottleneck
                   instruction -> m input-layer soft tokens  cfg.num_soft_tokens)
    lpt            late prompt tuning: generator at layer    bottleneck r (m fixed)       cfg.bottleneck
                   L // 2 from the instruction's states
    ============== ======================================== ============================ =====================

At IAPT r=32's budget on SmolLM2-135M (1,128,360): LoRA r=20 (1,152,000), prompt tuning 1959 virtual tokens
(1,128,384: every sequence grows by 1959 positions), prefix 98 tokens (1,128,960), IDPG and LPT r=391 with
m=4 (1,128,775).

``--budget N`` picks the size whose exact trainable-parameter count is closest to N (ties: the smaller size).
``count_for(method, base, size)`` gives that count, ``size_for_budget(method, base, budget)`` the size; both
take an optional ``cfg`` (a TrainConfig) for the options that change counts (``num_soft_tokens``; ``pooling``
for LPT/IDPG: TrainConfig's IAPT values 'attention' leaves each method's default, LPT/IDPG poolings pass
through). See ``peft_methods`` for the PEFT/transformers incompatibilities this package works around, and
``generated`` for IDPG and LPT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iapt.baselines.generated import (
    POOLINGS,
    GeneratedPromptConfig,
    GeneratedPromptModel,
    InstancePromptGenerator,
    generator_parameter_count,
)
from iapt.baselines.peft_methods import (
    PeftBaseline,
    build_lora,
    build_prefix,
    build_prompt_tuning,
    load_peft,
    lora_count,
    lora_targets,
    prefix_count,
    prompt_tuning_count,
)

__all__ = [
    "METHODS", "BaselineMethod", "GeneratedPromptConfig", "GeneratedPromptModel", "InstancePromptGenerator",
    "PeftBaseline", "build_baseline", "count_for", "generated_config", "get_method", "known_methods",
    "load_baseline", "lora_targets", "size_for", "size_for_budget",
]


def _options(cfg: Any) -> Any:
    if cfg is None:
        from iapt.training.config import TrainConfig

        return TrainConfig()
    return cfg


def _text(base: nn.Module) -> Any:
    config = base.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def generated_config(kind: str, base: nn.Module, bottleneck: int, cfg: Any = None) -> GeneratedPromptConfig:
    """The IDPG / LPT config a TrainConfig asks for, with the given bottleneck."""
    cfg = _options(cfg)
    pooling = cfg.pooling if getattr(cfg, "pooling", None) in POOLINGS else None
    return GeneratedPromptConfig(peft_type=kind, num_soft_tokens=cfg.num_soft_tokens, bottleneck=bottleneck,
                                 pooling=pooling)


def _generated_count(kind: str) -> Callable[[nn.Module, int, Any], int]:
    def count(base: nn.Module, size: int, cfg: Any) -> int:
        return generator_parameter_count(_text(base).hidden_size, generated_config(kind, base, size, cfg))

    return count


def _generated_build(kind: str) -> Callable[[nn.Module, int, Any], nn.Module]:
    def build(base: nn.Module, size: int, cfg: Any) -> nn.Module:
        model = GeneratedPromptModel(base, generated_config(kind, base, size, cfg))
        vocab = base.get_input_embeddings().num_embeddings
        model.init_from_tokens(torch.randint(0, vocab, (model.num_soft_tokens,)))
        return model

    return build


@dataclass(frozen=True)
class BaselineMethod:
    """One registered baseline: how to size, count, build and load it."""

    name: str
    peft_type: str  # what adapter_config.json's peft_type says
    size_name: str  # what the budget picks
    default_size: Callable[[Any], int]  # cfg -> size when cfg.budget is None
    count: Callable[[nn.Module, int, Any], int]  # (base, size, cfg) -> exact trainable parameters
    build: Callable[[nn.Module, int, Any], nn.Module]  # (base, size, cfg) -> model


METHODS: dict[str, BaselineMethod] = {
    m.name: m for m in [
        BaselineMethod("lora", "LORA", "rank", lambda cfg: 8,
                       lambda base, r, cfg: lora_count(base, r), lambda base, r, cfg: build_lora(base, r)),
        BaselineMethod("prompt-tuning", "PROMPT_TUNING", "num_virtual_tokens", lambda cfg: 20,
                       lambda base, m, cfg: prompt_tuning_count(base, m),
                       lambda base, m, cfg: build_prompt_tuning(base, m)),
        BaselineMethod("prefix", "PREFIX_TUNING", "num_virtual_tokens", lambda cfg: 10,
                       lambda base, m, cfg: prefix_count(base, m), lambda base, m, cfg: build_prefix(base, m)),
        BaselineMethod("idpg", "IDPG", "bottleneck", lambda cfg: cfg.bottleneck,
                       _generated_count("IDPG"), _generated_build("IDPG")),
        BaselineMethod("lpt", "LPT", "bottleneck", lambda cfg: cfg.bottleneck,
                       _generated_count("LPT"), _generated_build("LPT")),
    ]
}
_BY_PEFT_TYPE = {m.peft_type: m for m in METHODS.values()}


def known_methods() -> list[str]:
    return list(METHODS)


def get_method(method: str) -> BaselineMethod:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: iapt, {', '.join(METHODS)}")
    return METHODS[method]


def _iapt_count(base: nn.Module, bottleneck: int, cfg: Any) -> int:
    from iapt.config import IAPTConfig
    from iapt.generator import generator_parameter_count as iapt_generator_count

    text = _text(base)
    config = IAPTConfig(bottleneck=bottleneck, num_soft_tokens=cfg.num_soft_tokens)
    return text.num_hidden_layers * iapt_generator_count(text.hidden_size, config)


def _counter(method: str) -> Callable[[nn.Module, int, Any], int]:
    """The count function of a baseline, or of IAPT itself (size = bottleneck r, every layer), for reports."""
    return _iapt_count if method == "iapt" else get_method(method).count


def count_for(method: str, base: nn.Module, size: int, cfg: Any = None) -> int:
    """Exact trainable-parameter count of ``method`` at ``size`` on ``base`` (cfg: TrainConfig options).

    ``method`` is a baseline or "iapt" (size = its bottleneck r; the trainer sizes IAPT by the same rule).
    """
    counter = _counter(method)
    if size < 1:
        raise ValueError(f"{method} size must be >= 1, got {size}")
    return counter(base, size, _options(cfg))


def size_for_budget(method: str, base: nn.Module, budget: int, cfg: Any = None) -> int:
    """The size (>= 1) whose count is closest to ``budget``; ties go to the smaller size.

    Every count is affine in the size (count = a·size + b), so the best size is next to (budget - b) / a.
    """
    count, cfg = _counter(method), _options(cfg)
    if budget is None or budget < 1:
        raise ValueError(f"budget must be a positive parameter count, got {budget!r}")
    c1, c2 = count(base, 1, cfg), count(base, 2, cfg)
    guess = 1 + (budget - c1) // max(c2 - c1, 1)
    candidates = {max(1, guess + d) for d in (-1, 0, 1, 2)} | {1}
    return min(candidates, key=lambda s: (abs(count(base, s, cfg) - budget), s))


def size_for(cfg: Any, base: nn.Module) -> int:
    """The size a training run uses: the budget rule, or the method's default without a budget."""
    spec = get_method(cfg.method)
    return spec.default_size(cfg) if cfg.budget is None else size_for_budget(cfg.method, base, cfg.budget, cfg)


def build_baseline(cfg: Any, base: nn.Module) -> nn.Module:
    """Freeze ``base`` and install ``cfg.method`` (sized by ``cfg.budget`` or the defaults) on it."""
    spec = get_method(cfg.method)
    return spec.build(base, size_for(cfg, base), cfg)


def load_baseline(base: nn.Module, directory: str | Path, kind: str) -> nn.Module:
    """Install the saved adapter in ``directory`` (its ``peft_type`` is ``kind``) on ``base``, for inference."""
    directory = Path(directory)
    if kind not in _BY_PEFT_TYPE:
        raise ValueError(f"adapter {directory} is of type {kind!r}, which this version cannot load; known types: "
                         f"IAPT, {', '.join(_BY_PEFT_TYPE)}")
    spec = _BY_PEFT_TYPE[kind]
    if kind in ("IDPG", "LPT"):
        return GeneratedPromptModel.from_pretrained(base, directory)
    return load_peft(base, directory, spec.name)
