"""Baselines of the paper, trained, saved and loaded like IAPT: their entries of the method registry
(``iapt.methods``, which adds IAPT's), each a builder + budget rule + loader.

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
``iapt.methods.count_for(method, base, size)`` gives that count, ``size_for_budget(method, base, budget)`` the
size; both take optional options (a TrainConfig or MethodOptions) for the ones that change counts
(``num_soft_tokens``; ``pooling`` for LPT/IDPG: TrainConfig's IAPT value 'attention' leaves each method's
default, LPT/IDPG poolings pass through). See ``peft_methods`` for the PEFT/transformers incompatibilities this
package works around, and ``generated`` for IDPG and LPT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iapt.backbone import input_embeddings, text_config
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
from iapt.options import Method, MethodOptions

__all__ = [
    "BASELINES",
    "GeneratedPromptConfig",
    "GeneratedPromptModel",
    "InstancePromptGenerator",
    "PeftBaseline",
    "generated_config",
    "lora_targets",
]


def _options(cfg: Any) -> Any:
    return MethodOptions() if cfg is None else cfg


def generated_config(kind: str, base: nn.Module, bottleneck: int, cfg: Any = None) -> GeneratedPromptConfig:
    """The IDPG / LPT config a TrainConfig asks for, with the given bottleneck."""
    cfg = _options(cfg)
    pooling = cfg.pooling if getattr(cfg, "pooling", None) in POOLINGS else None
    return GeneratedPromptConfig(
        peft_type=kind, num_soft_tokens=cfg.num_soft_tokens, bottleneck=bottleneck, pooling=pooling
    )


def _generated_count(kind: str) -> Callable[[nn.Module, int, Any], int]:
    def count(base: nn.Module, size: int, cfg: Any) -> int:
        return generator_parameter_count(text_config(base).hidden_size, generated_config(kind, base, size, cfg))

    return count


def _generated_build(kind: str) -> Callable[[nn.Module, int, Any], nn.Module]:
    def build(base: nn.Module, size: int, cfg: Any) -> nn.Module:
        model = GeneratedPromptModel(base, generated_config(kind, base, size, cfg))
        vocab = input_embeddings(base).num_embeddings
        model.init_from_tokens(torch.randint(0, vocab, (model.num_soft_tokens,)))
        return model

    return build


def _load_generated(base: nn.Module, directory: Path) -> nn.Module:
    return GeneratedPromptModel.from_pretrained(base, directory)


def _load_peft(name: str) -> Callable[[nn.Module, Path], nn.Module]:
    return lambda base, directory: load_peft(base, directory, name)


BASELINES: list[Method] = [
    Method(
        "lora",
        "LORA",
        "rank",
        lambda cfg: 8,
        lambda base, r, cfg: lora_count(base, r),
        lambda base, r, cfg: build_lora(base, r),
        _load_peft("lora"),
    ),
    Method(
        "prompt-tuning",
        "PROMPT_TUNING",
        "num_virtual_tokens",
        lambda cfg: 20,
        lambda base, m, cfg: prompt_tuning_count(base, m),
        lambda base, m, cfg: build_prompt_tuning(base, m),
        _load_peft("prompt-tuning"),
    ),
    Method(
        "prefix",
        "PREFIX_TUNING",
        "num_virtual_tokens",
        lambda cfg: 10,
        lambda base, m, cfg: prefix_count(base, m),
        lambda base, m, cfg: build_prefix(base, m),
        _load_peft("prefix"),
    ),
    Method(
        "idpg",
        "IDPG",
        "bottleneck",
        lambda cfg: cfg.bottleneck,
        _generated_count("IDPG"),
        _generated_build("IDPG"),
        _load_generated,
    ),
    Method(
        "lpt",
        "LPT",
        "bottleneck",
        lambda cfg: cfg.bottleneck,
        _generated_count("LPT"),
        _generated_build("LPT"),
        _load_generated,
    ),
]


# Deprecated names (0.1.0): the registry functions moved to iapt.methods, which also holds IAPT's entry. They
# import it lazily (iapt.methods imports this package); remove them in 0.3.0.
def count_for(*args: Any, **kwargs: Any) -> int:
    """Deprecated: ``iapt.methods.count_for``."""
    from iapt import methods

    return methods.count_for(*args, **kwargs)


def size_for_budget(*args: Any, **kwargs: Any) -> int:
    """Deprecated: ``iapt.methods.size_for_budget``."""
    from iapt import methods

    return methods.size_for_budget(*args, **kwargs)


def build_baseline(cfg: Any, base: nn.Module) -> nn.Module:
    """Deprecated: ``iapt.methods.build``."""
    from iapt import methods

    return methods.build(cfg, base)


def load_baseline(base: nn.Module, directory: str | Path, kind: str) -> nn.Module:
    """Deprecated: ``iapt.methods.load``."""
    from iapt import methods

    return methods.load(base, directory, kind)
