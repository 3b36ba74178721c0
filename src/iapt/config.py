"""IAPTConfig: everything that defines an IAPT adapter, saved as ``adapter_config.json``.

It is a PEFT ``PeftConfig`` (task type CAUSAL_LM, PEFT's fields and version stamp), so ``get_peft_model`` and
``PeftModel.from_pretrained`` take it (``iapt.peft_method``); unknown keys written by a newer version are ignored
with a warning, as PEFT does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

from peft import PeftConfig

from iapt.rational import RATIONAL_INITS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
POOLINGS = ("attention", "mean", "last")
ANCHORS = ("tokens", "pad", "none")
INSERTIONS = ("hidden", "kv")
OUTPUT_SCALES = ("none", "anchor")


class AdapterConfigMixin:
    """``adapter_config.json`` for every adapter config of the project (IAPT, IDPG, LPT), read and written once:
    JSON of the dataclass fields, written atomically; keys this version does not know (a newer one wrote them) are
    dropped with a warning, as PEFT does; a missing file is FileNotFoundError, a corrupt or wrong one a ValueError
    naming the file."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(cast(Any, self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """From a saved config; keys this version does not know are dropped, with a warning."""
        known = {f.name for f in dataclasses.fields(cast(Any, cls))}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"ignoring {cls.__name__} fields this version does not know: {unknown} (written by a newer "
                f"iapt or PEFT?); upgrade to use them",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | os.PathLike) -> Path:
        from iapt.io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Self:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no adapter config at {path}: is {directory} an adapter folder?")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"adapter config {path} is not valid JSON ({exc}); the file is corrupt") from None
        if not isinstance(data, dict):
            raise ValueError(f"adapter config {path} must hold a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"adapter config {path}: {exc}") from None


@dataclass
class IAPTConfig(AdapterConfigMixin, PeftConfig):
    """Configuration of an IAPT adapter (Instruction-Aware Prompt Tuning, arXiv 2405.18203)."""

    num_soft_tokens: int = field(default=4, metadata={"help": "Soft tokens written at every layer (n; paper: 4)."})
    bottleneck: int = field(default=32, metadata={"help": "Bottleneck width r of each prompt generator (r << d)."})
    activation_init: str = field(
        default="gelu",
        metadata={"help": f"Function the rational activations start from: one of {sorted(RATIONAL_INITS)}."},
    )
    pooling: str = field(
        default="attention",
        metadata={
            "help": "How a generator summarises the instruction: 'attention' (the method: one learned query "
            "per soft token), or the ablations 'mean' / 'last' (masked mean / last instruction token, "
            "plus a learned offset per soft token)."
        },
    )
    bias: bool = field(default=True, metadata={"help": "Biases on the down- and up-projections."})
    input_norm: bool = field(
        default=True,
        metadata={
            "help": "Parameter-free RMS normalisation of the hidden states before the down-projection. "
            "Residual streams carry outlier channels in the hundreds, which would push the rational "
            "function far outside the range its initial fit is valid on."
        },
    )
    anchor: str = field(
        default="pad",
        metadata={
            "help": "What the soft tokens start from. 'pad' (default): soft tokens = the bare backbone's own "
            "states of n pad tokens at the slots (computed from the base at load, not saved) + the "
            "generator's output; a fresh adapter is then exactly the backbone with n pad tokens in "
            "front. 'tokens': the same with n frequent vocabulary tokens (``anchor_token_ids``). "
            "'none': the paper's zero start, where the layer's RMS norm turns the first update, however "
            "small, into a full-size vector of arbitrary direction (the loss spike of docs/METHOD.md). "
            "Old files' true/false read as 'pad'/'none'."
        },
    )
    anchor_token_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "The n token ids whose backbone states anchor the slots ('tokens': drawn on install from "
            "frequent vocabulary ids when not given; 'pad': n pad ids). Recorded on install."
        },
    )
    insertion: str = field(
        default="hidden",
        metadata={
            "help": "Where the soft tokens enter each layer. 'hidden' (the paper): they replace the slots' "
            "hidden states at the layer's input, so they reach attention through the layer's frozen "
            "norm and key/value projections. 'kv': the generator writes the slots' keys and values "
            "directly (P-tuning v2's insertion, fed by IAPT's instruction-aware generator): its output "
            "(n x (key + value width)) is added to the slots' k_proj / v_proj outputs, whose input is "
            "the anchor state. Needs separate k_proj and v_proj modules (Llama, Qwen2, Mistral, "
            "Gemma); not yet served by the built-in engine."
        },
    )
    output_scale: str = field(
        default="none",
        metadata={
            "help": "Units of the generator's output. 'none' (the paper): added to the anchor as it is. 'anchor': "
            "multiplied first by the RMS of the slot's anchor state at that layer. Anchor states differ in size "
            "by four orders of magnitude across layers (SmolLM2's pad states: RMS 0.1 at layer 0, ~1,000 in "
            "layers 12-28, 99% of it in 3 channels) while one LR serves every generator; in anchor units an "
            "update means a comparable relative change of the slot at every layer. Needs an anchor; "
            "insertion='hidden' only. Served by the built-in engine and the vLLM plugin."
        },
    )
    sink_token: bool = field(
        default=False,
        metadata={
            "help": "One plain slot-token column in front of the soft tokens that no generator writes. Decoders "
            "make their first position an attention sink (SmolLM2: RMS ~1,000 in 3 channels, 0.39 of later "
            "tokens' attention); without this column the soft tokens sit there and become the sink. With it "
            "the backbone keeps its own sink and the soft tokens are ordinary positions 1..n, anchored on the "
            "states their anchor tokens have there (pad tokens after a pad stay sink-like: use anchor='tokens'). "
            "Costs one cached position per request."
        },
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Indices of the layers that get a generator; None = every layer (the method)."}
    )
    layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path to the decoder's layer list (e.g. 'model.layers') for a family iapt does not "
            "know yet; None = look it up by model_type."
        },
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "What base model the adapter was trained on (recorded, informational)."}
    )
    base_model_type: str | None = field(
        default=None, metadata={"help": "Recorded on install: the base's config.model_type, checked on load."}
    )
    base_hidden_size: int | None = field(
        default=None, metadata={"help": "Recorded on install: the base's hidden size d, checked on load."}
    )
    base_num_layers: int | None = field(
        default=None, metadata={"help": "Recorded on install: the base's number of layers, checked on load."}
    )
    peft_type: str = field(default="IAPT", metadata={"help": "Method tag, as PEFT writes it."})
    task_type: str | None = field(default="CAUSAL_LM", metadata={"help": "PEFT task type (IAPT: causal LMs)."})

    @property
    def num_slots(self) -> int:
        """Positions a request's slots take in front of its prompt: the soft tokens, plus the sink column."""
        return self.num_soft_tokens + int(self.sink_token)

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's checks: a known task type; stamps peft_version
        if self.num_soft_tokens < 1:
            raise ValueError(f"num_soft_tokens must be >= 1, got {self.num_soft_tokens}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.activation_init not in RATIONAL_INITS:
            raise ValueError(
                f"activation_init={self.activation_init!r} is unknown; choose one of {sorted(RATIONAL_INITS)}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown; choose one of {list(POOLINGS)}")
        if self.insertion not in INSERTIONS:
            raise ValueError(f"insertion={self.insertion!r} is unknown; choose one of {list(INSERTIONS)}")
        if isinstance(self.anchor, bool):  # files written before the anchor had modes
            self.anchor = "pad" if self.anchor else "none"
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor={self.anchor!r} is unknown; choose one of {list(ANCHORS)}")
        if self.output_scale not in OUTPUT_SCALES:
            raise ValueError(f"output_scale={self.output_scale!r} is unknown; choose one of {list(OUTPUT_SCALES)}")
        if self.output_scale == "anchor" and (self.anchor == "none" or self.insertion != "hidden"):
            raise ValueError(
                "output_scale='anchor' measures the generator's output in units of the slots' anchor states: it "
                f"needs an anchor ('pad' or 'tokens', got {self.anchor!r}) and insertion='hidden' (got "
                f"{self.insertion!r})"
            )
        if self.anchor_token_ids is not None:
            if self.anchor == "none":
                raise ValueError("anchor_token_ids are given but anchor='none' (the zero start) uses none")
            if len(self.anchor_token_ids) != self.num_soft_tokens or not all(
                isinstance(t, int) and t >= 0 for t in self.anchor_token_ids
            ):
                raise ValueError(
                    f"anchor_token_ids must be {self.num_soft_tokens} non-negative token ids (one per "
                    f"soft token), got {self.anchor_token_ids!r}"
                )
        if self.peft_type != "IAPT":
            raise ValueError(f"this is not an IAPT adapter config (peft_type={self.peft_type!r})")
