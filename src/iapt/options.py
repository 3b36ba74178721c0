"""MethodOptions: what shapes a method's adapter, shared by every method's build and parameter count.

``TrainConfig`` extends it; the method registry (``iapt.methods``) and the baselines take any object with these
fields, and this leaf module is what lets both use the defaults without importing the training code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class MethodOptions:
    """Sizes and shapes of an adapter beyond its budget (each method reads the ones it has)."""

    num_soft_tokens: int = field(default=4, metadata={"help": "Soft tokens per layer (IAPT; IDPG and LPT: m)."})
    bottleneck: int = field(
        default=32, metadata={"help": "Generator bottleneck r (IAPT, IDPG, LPT) without a --budget."}
    )
    activation_init: str = field(default="gelu", metadata={"help": "Initial function of IAPT's rational activations."})
    pooling: str = field(
        default="attention",
        metadata={"help": "IAPT pooling: attention, mean or last (IDPG/LPT poolings pass through to them)."},
    )
    anchor: str = field(
        default="pad",
        metadata={
            "help": "IAPT start: pad (soft tokens = the backbone's states of n "
            "pad tokens + the generator output), tokens (n frequent "
            "vocabulary tokens), none (the paper's zero start, which "
            "spikes the loss); see IAPTConfig.anchor."
        },
    )

    anchor_token_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "IAPT anchor='tokens': the n token ids whose backbone states anchor the slots (default: drawn from "
            "frequent vocabulary ids)."
        },
    )

    insertion: str = field(
        default="hidden",
        metadata={
            "help": "IAPT: where the soft tokens enter each layer: hidden (the paper: the slots' hidden states) or kv "
            "(the generator writes the slots' keys and values); see IAPTConfig.insertion."
        },
    )

    output_scale: str = field(
        default="none",
        metadata={
            "help": "IAPT: units of the generator's output: none (the paper: added to the anchor as it is) or anchor "
            "(times the RMS of the slot's anchor state); see IAPTConfig.output_scale."
        },
    )

    sink_token: bool = field(
        default=False,
        metadata={
            "help": "IAPT: one plain slot-token column before the soft tokens, so the backbone keeps its own "
            "attention sink at the first position; see IAPTConfig.sink_token."
        },
    )

    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "IAPT: the layers that get a generator (None = every layer, the paper). With a --budget the "
            "bottleneck is sized over these layers only, so fewer layers get wider generators."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.anchor, bool):  # recipes and run folders written when it was a flag
            self.anchor = "pad" if self.anchor else "none"


@dataclass(frozen=True)
class Method:
    """One trainable method of the registry (``iapt.methods``): how to size, count, build and load it."""

    name: str
    peft_type: str  # what adapter_config.json's peft_type says
    size_name: str  # what the budget picks
    default_size: Callable[[Any], int]  # options -> size when there is no budget
    count: Callable[[nn.Module, int, Any], int]  # (base, size, options) -> exact trainable parameters
    build: Callable[[nn.Module, int, Any], nn.Module]  # (base, size, options) -> model with the adapter installed
    load: Callable[[nn.Module, Path], nn.Module]  # (base, adapter folder) -> model with the saved adapter
