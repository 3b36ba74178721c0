"""IDPG and LPT: instance-dependent prompts written at ONE layer (own code, on IAPT's slot machinery).

* **IDPG** (Wu et al., arXiv 2204.04497, "Instance-Dependent Prompt Generation"): one generator reads the
  instruction and writes ``m`` soft tokens for the **input layer** only. Default input: the mean of the
  instruction tokens' input embeddings (the hidden states entering layer 0: the token embeddings for
  Llama/Qwen2/Mistral, the sqrt(d)-scaled embeddings for Gemma, token + position embeddings for GPT-2).
  ``source="last_layer"`` reads the frozen model's last hidden states instead (one extra forward pass of the
  bare backbone per request, as in the IDPG paper, whose generator reads the frozen encoder's sentence vector).
  Generator: a bottleneck MLP ``d -> r -> m*d`` (the IDPG paper's; its PHM factorisation is not used).
* **LPT** (Liu et al., arXiv 2210.11292, "Late Prompt Tuning"): one "instance-aware prompt generator" at a
  middle layer ``k`` (default ``L // 2``) reads the instruction's hidden states entering that layer and writes
  ``m`` soft tokens that exist from layer ``k`` upwards only. Generators as in the authors' code: ``last``
  (their NPG, used in their decoder-only runs: the last instruction token, ``d -> r -> m*d``), ``mean`` /
  ``max`` (a pooled vector through the same MLP), ``adaptive-mean`` / ``adaptive-max`` (their APPG / MPPG:
  down-project every token ``d -> r``, adaptive-pool the instruction into ``m`` segments, activation, ``r -> d``).

Both run on :class:`iapt.model.IAPTModel`'s machinery: ``m`` reserved slots in front of the sequence whose
hidden states a forward pre-hook overwrites at layer ``k`` at prefill; the KV cache, masks and positions are the
backbone's own. For LPT the slots must not exist below layer ``k``: a pre-hook on every layer below ``k`` masks
the slot columns out of attention for every real token (prefill and decode steps alike), so the real tokens'
states below layer ``k`` are exactly those of the bare backbone (up to the position offset of ``m``, which
rotary models do not see), and what the slots hold below ``k`` (the pad token's states) reaches nothing: it is
replaced at layer ``k``. This needs an explicit attention mask, so LPT supports ``attn_implementation``
``sdpa`` and ``eager`` (refused otherwise with a clear error).

Design choices the papers leave open: a parameter-free RMS normalisation of the generator input (as IAPT's
``input_norm``: mid-layer residual streams carry outlier channels), ReLU as the activation (the LPT code's; IDPG
too), an up-projection that starts with zero weights and the frozen model's states of random vocabulary tokens
as its bias (``init_from_tokens``: prompt tuning's vocabulary init, at the insertion layer), no dropout on the
prompts, float32 generator weights whatever the backbone's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from iapt.adapter_files import read_weights, weights_path
from iapt.backbone import check_base, check_compatible, find_layers, input_embeddings, slot_token_id, text_config
from iapt.config import WEIGHTS_NAME, AdapterConfigMixin
from iapt.io import atomic_write
from iapt.model import IAPTModel, SlotCall
from iapt.slots import SlotWriter

# IDPG last_layer: the frozen model's states of the prompt, for the call being made in this thread
_CONTEXT: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("iapt_idpg_context", default=None)

KINDS = ("IDPG", "LPT")
VECTOR_POOLINGS = ("mean", "max", "last")  # one vector, then d -> r -> m*d
SEGMENT_POOLINGS = ("adaptive-mean", "adaptive-max")  # d -> r per token, m segments, then r -> d
POOLINGS = VECTOR_POOLINGS + SEGMENT_POOLINGS
SOURCES = ("embeddings", "last_layer")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
DEFAULT_POOLING = {"IDPG": "mean", "LPT": "last"}
_RMS_EPS = 1e-6


@dataclass
class GeneratedPromptConfig(AdapterConfigMixin):
    """An IDPG or LPT adapter, saved as ``adapter_config.json`` (``peft_type`` "IDPG" / "LPT")."""

    peft_type: str = field(default="LPT", metadata={"help": "IDPG (input layer) or LPT (one middle layer)."})
    num_soft_tokens: int = field(default=4, metadata={"help": "Soft tokens m written at the insertion layer."})
    bottleneck: int = field(default=32, metadata={"help": "Bottleneck width r of the generator."})
    layer: int | None = field(
        default=None,
        metadata={"help": "Insertion layer k (its input gets the soft tokens). IDPG: 0. LPT: None = num_layers // 2."},
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": f"How the instruction is summarised: one of {list(POOLINGS)}; None = IDPG 'mean', LPT 'last'."
        },
    )
    source: str = field(
        default="embeddings",
        metadata={
            "help": "IDPG only: what the generator reads, 'embeddings' (the input layer) or 'last_layer' (the frozen "
            "model's last hidden states, one extra backbone pass per request)."
        },
    )
    activation: str = field(default="relu", metadata={"help": f"Generator activation: {sorted(ACTIVATIONS)}."})
    input_norm: bool = field(default=True, metadata={"help": "Parameter-free RMS norm of the generator input."})
    bias: bool = field(default=True, metadata={"help": "Biases on the two projections."})
    layers_path: str | None = field(
        default=None, metadata={"help": "Dotted path of the layer list (unknown families)."}
    )
    base_model_name_or_path: str | None = None
    base_model_type: str | None = None
    base_hidden_size: int | None = None
    base_num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.peft_type not in KINDS:
            raise ValueError(f"peft_type={self.peft_type!r}: this config describes one of {list(KINDS)}")
        if self.pooling is None:
            self.pooling = DEFAULT_POOLING[self.peft_type]
        if self.num_soft_tokens < 1:
            raise ValueError(f"num_soft_tokens must be >= 1, got {self.num_soft_tokens}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown; choose one of {list(POOLINGS)}")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} is unknown; choose one of {list(SOURCES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
        if self.peft_type == "IDPG":
            if self.layer not in (None, 0):
                raise ValueError(f"IDPG writes its prompts at the input layer (layer 0), not layer {self.layer}")
            self.layer = 0
        elif self.source != "embeddings":
            raise ValueError("source='last_layer' is an IDPG option; LPT reads the hidden states at its own layer")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")


def generator_parameter_count(hidden_size: int, config: GeneratedPromptConfig) -> int:
    """Trainable parameters of the one generator: d·r + r·m·d (+ r + m·d), or 2·d·r (+ r + d) for segments."""
    d, r, m = hidden_size, config.bottleneck, config.num_soft_tokens
    if config.pooling in SEGMENT_POOLINGS:
        return 2 * d * r + ((r + d) if config.bias else 0)
    return d * r + r * m * d + ((r + m * d) if config.bias else 0)


def _segments(keep: torch.Tensor, m: int) -> torch.Tensor:
    """(B, T, m) membership of each kept token in torch's adaptive-pooling segments of that row's kept tokens."""
    rank = keep.long().cumsum(1) - 1  # index of a kept token among its row's kept tokens
    count = keep.long().sum(1, keepdim=True)  # (B, 1)
    j = torch.arange(m, device=keep.device)
    start = (j * count) // m  # floor(j·L/m), as nn.AdaptiveAvgPool1d
    end = -((-(j + 1) * count) // m)  # ceil((j+1)·L/m)
    inside = (rank.unsqueeze(-1) >= start.unsqueeze(1)) & (rank.unsqueeze(-1) < end.unsqueeze(1))
    return inside & keep.unsqueeze(-1)


class InstancePromptGenerator(nn.Module):
    """Instruction hidden states ``(B, T, d)`` + mask ``(B, T)`` in, ``m`` soft tokens ``(B, m, d)`` out."""

    def __init__(self, hidden_size: int, config: GeneratedPromptConfig) -> None:
        super().__init__()
        d, r, m = hidden_size, config.bottleneck, config.num_soft_tokens
        self.pooling, self.input_norm, self.num_soft_tokens = config.pooling, config.input_norm, m
        self.down = nn.Linear(d, r, bias=config.bias, dtype=torch.float32)
        self.activation = ACTIVATIONS[config.activation]()
        out = d if config.pooling in SEGMENT_POOLINGS else m * d
        self.up = nn.Linear(r, out, bias=config.bias, dtype=torch.float32)
        # A fresh generator writes instance-independent tokens: zero up-projection weights, and a bias that
        # GeneratedPromptModel.init_from_tokens sets to the states of real tokens (zero until then).
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)
        else:  # nothing to start from: random directions (the only choice without a bias)
            nn.init.normal_(self.up.weight, std=1.0 / r**0.5)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        if self.input_norm:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _RMS_EPS)
        keep = mask.to(device=h.device, dtype=torch.bool)
        batch, m = h.shape[0], self.num_soft_tokens
        if self.pooling in SEGMENT_POOLINGS:
            z = self.down(h)  # (B, T, r)
            member = _segments(keep, m)  # (B, T, m)
            if self.pooling == "adaptive-mean":
                w = member.float()
                pooled = (w.transpose(1, 2) @ z) / w.sum(1).clamp_min(1.0).unsqueeze(-1)  # (B, m, r)
            else:
                filled = z.unsqueeze(2).masked_fill(~member.unsqueeze(-1), torch.finfo(z.dtype).min)
                pooled = filled.amax(1) * member.any(1).unsqueeze(-1)  # empty instruction: zeros
            return self.up(self.activation(pooled))
        if self.pooling == "mean":
            w = keep.float().unsqueeze(-1)
            vector = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        elif self.pooling == "max":
            vector = h.masked_fill(~keep.unsqueeze(-1), torch.finfo(h.dtype).min).amax(1) * keep.any(1, keepdim=True)
        else:  # last instruction token
            last = (keep.long() * torch.arange(1, keep.shape[1] + 1, device=keep.device)).argmax(1)
            vector = h[torch.arange(batch, device=h.device), last] * keep.any(1, keepdim=True)
        return self.up(self.activation(self.down(vector))).view(batch, m, -1)


class GeneratedPromptModel(IAPTModel):
    """A frozen causal LM with ONE prompt generator at layer ``k`` (IDPG: k = 0; LPT: k = L // 2).

    Reuses :class:`IAPTModel`'s ``forward`` / ``generate`` (slots, left padding, KV cache, instruction masks):
    only the generator, the layers that get hooks and save/load differ. Logits are aligned with
    ``input_ids``; ``generate`` returns the prompt followed by the new tokens.
    """

    accepts_instruction_mask = True  # the trainer passes the collator's instruction mask
    # LPT hides the slots from the layers below its insertion layer by column index (0..n-1), so these keep
    # the slots in front of the padding: exact for full attention, not for rows padded past a sliding window.
    slots_after_padding = False

    def __init__(self, base_model: nn.Module, config: GeneratedPromptConfig) -> None:
        nn.Module.__init__(self)
        check_base(base_model)
        base_model = cast(PreTrainedModel, base_model)  # a Hugging Face causal LM (duck-typed by check_base)
        text = text_config(base_model)
        hidden_size, num_layers = text.hidden_size, text.num_hidden_layers
        decoder_layers = find_layers(base_model, config.layers_path)
        layer = config.layer if config.layer is not None else len(decoder_layers) // 2
        if not 0 <= layer < len(decoder_layers):
            raise ValueError(
                f"{config.peft_type} insertion layer {layer} is outside the model's layers 0..{len(decoder_layers) - 1}"
            )
        if layer > 0:
            impl = getattr(base_model.config, "_attn_implementation", None) or "sdpa"
            if impl not in ("sdpa", "eager"):
                raise ValueError(
                    f"{config.peft_type} hides its soft-token slots from layers 0..{layer - 1} with an explicit "
                    f"attention mask, which attn_implementation={impl!r} does not take; load the base model "
                    f"with attn_implementation='sdpa' or 'eager'"
                )
        config.layer = layer
        config.base_model_type = base_model.config.model_type
        config.base_hidden_size = hidden_size
        config.base_num_layers = num_layers
        config.base_model_name_or_path = (
            config.base_model_name_or_path or getattr(base_model.config, "_name_or_path", None) or None
        )

        for p in base_model.parameters():
            p.requires_grad_(False)
        self.base_model = base_model
        self.adapter_config = config
        self.num_soft_tokens = config.num_soft_tokens
        self.insertion_layer = layer
        device = input_embeddings(base_model).weight.device
        self.prompt_generator = InstancePromptGenerator(hidden_size, config).to(device)
        self.slot_token_id = slot_token_id(base_model)

        self._hooks = [base_model.register_forward_pre_hook(self._before_backbone, with_kwargs=True)]
        self.slot_writer = SlotWriter({layer: decoder_layers[layer]}, self._soft_tokens)
        for i in range(layer):  # LPT: below the insertion layer the slots do not exist for the real tokens
            params = list(inspect.signature(decoder_layers[i].forward).parameters)
            position = params.index("attention_mask") if "attention_mask" in params else None
            self._hooks.append(
                decoder_layers[i].register_forward_pre_hook(
                    functools.partial(self._hide_slots, position), with_kwargs=True
                )
            )

    # ------------------------------------------------------------------ hooks
    def _soft_tokens(self, layer: int, hidden: torch.Tensor, call: SlotCall) -> tuple[torch.Tensor, None]:
        """The slot writer's source: the m soft tokens of this prefill (slots in columns 0..m-1)."""
        n = self.num_soft_tokens
        assert call.plan is not None, "the slot writer asks for soft tokens at prefills only"
        real, mask = hidden[:, n:], call.plan.pooled[:, n:]
        if call.context is not None:  # IDPG last_layer: the frozen model's states of the prompt
            context = call.context.to(real.device)
            if context.shape[0] != real.shape[0]:  # generate expanded rows for beams / num_return_sequences
                context = context.repeat_interleave(real.shape[0] // context.shape[0], dim=0)
            if context.shape[1] < real.shape[1]:  # no-cache generation: generated tokens are not pooled anyway
                context = torch.nn.functional.pad(context, (0, 0, 0, real.shape[1] - context.shape[1]))
            real = context[:, : real.shape[1]]
        return self.prompt_generator(real, mask), None

    @contextlib.contextmanager
    def _slots(self, instruction_mask: torch.Tensor | None, is_slot: torch.Tensor | None) -> Iterator[SlotCall]:
        with super()._slots(instruction_mask, is_slot) as call:
            call.context = _CONTEXT.get()
            yield call

    def _hide_slots(self, position: int | None, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Below the insertion layer, mask the slot columns out of every real token's attention."""
        call = self.slot_writer.state
        if call is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if position is not None and len(args) > position:
            args = (
                *args[:position],
                self._slot_hiding_mask(args[position], hidden, call.past_length),
                *args[position + 1 :],
            )
            return args, kwargs
        return args, {
            **kwargs,
            "attention_mask": self._slot_hiding_mask(kwargs.get("attention_mask"), hidden, call.past_length),
        }

    def _slot_hiding_mask(self, mask: Any, hidden: torch.Tensor, past: int) -> torch.Tensor:
        n, q = self.num_soft_tokens, hidden.shape[1]
        rows = past + torch.arange(q, device=hidden.device)  # absolute index of each query (slots included)
        if mask is None:
            # sdpa's "is_causal" shortcut: no padding and nothing but causality (no sliding window in reach)
            impl = getattr(self.base_model.config, "_attn_implementation", None) or "sdpa"
            if impl != "sdpa":
                raise ValueError(
                    f"{self.adapter_config.peft_type} needs an attention mask below its insertion "
                    f"layer; attn_implementation={impl!r} gave none (use 'sdpa' or 'eager')"
                )
            cols = torch.arange(past + q, device=hidden.device)
            allowed = cols.unsqueeze(0) <= rows.unsqueeze(1)
            return (allowed & ~((cols.unsqueeze(0) < n) & (rows.unsqueeze(1) >= n)))[None, None]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2] != q:
            raise ValueError(
                f"{self.adapter_config.peft_type} cannot hide its slots in a {type(mask).__name__} "
                f"attention mask (use attn_implementation 'sdpa' or 'eager')"
            )
        kv = mask.shape[-1]
        cols = past + q - kv + torch.arange(kv, device=mask.device)  # a dynamic cache's columns end at the query
        hide = (cols.unsqueeze(0) < n) & (rows.to(mask.device).unsqueeze(1) >= n)
        if not bool(hide.any()):
            return mask
        if mask.dtype == torch.bool:
            hidden_mask = mask & ~hide
            empty = ~hidden_mask.any(-1, keepdim=True)
        else:
            low = torch.finfo(mask.dtype).min
            hidden_mask = mask.masked_fill(hide, low)
            empty = (hidden_mask == low).all(-1, keepdim=True)
        # A padding query (left padding) sees nothing but the slots: leave its row as it was, so that no row is
        # fully masked (NaN in eager attention); padding positions reach nothing anyway.
        return torch.where(empty, mask, hidden_mask)

    @torch.no_grad()
    def init_from_tokens(self, token_ids: torch.Tensor) -> None:
        """Start from the frozen model's own states of ``token_ids`` entering the insertion layer.

        The soft tokens then begin as the hidden states of a hard prompt of real tokens (instance-independent:
        the up-projection's weights are zero, its bias holds the states), the analogue of prompt tuning's
        vocabulary init. Zero soft tokens would not do: a zero state stays exactly zero through every
        RMSNorm-residual layer above, where the norm's gradient at 0 (1/sqrt(eps) per layer) overflows to NaN
        within a few dozen layers (SmolLM2-135M: NaN after one step). Without biases this is a no-op.
        """
        up = self.prompt_generator.up
        if up.bias is None:
            return
        m, layer = self.num_soft_tokens, self.insertion_layer
        device = input_embeddings(self.base_model).weight.device
        ids = token_ids.reshape(1, -1).to(device)
        if ids.shape[1] != m:
            raise ValueError(f"init_from_tokens needs {m} token ids (one per soft token), got {ids.shape[1]}")
        was_training = self.base_model.training
        self.base_model.eval()
        try:
            out = self.base_model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        finally:
            self.base_model.train(was_training)
        states = out.hidden_states[layer][0].float()  # (m, d): what enters layer k at positions 0..m-1
        up.weight.zero_()
        up.bias.copy_(states.mean(0) if up.bias.numel() == states.shape[1] else states.reshape(-1))

    # ------------------------------------------------------------------ IDPG last_layer source
    @torch.no_grad()
    def _encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The bare frozen model's last hidden states of the prompt (positions from the mask: left padding)."""
        if input_ids is None:
            raise ValueError("IDPG with source='last_layer' needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        return out.hidden_states[-1].detach()

    def _needs_context(self, past_key_values: Any) -> bool:
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        return self.adapter_config.source == "last_layer" and not decoding

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        context = self._encode(input_ids, attention_mask) if self._needs_context(past_key_values) else None
        token = _CONTEXT.set(context)
        try:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                instruction_mask=instruction_mask,
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        finally:
            _CONTEXT.reset(token)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self._needs_context(None) and input_ids is not None:
            ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
            mask = (
                attention_mask if attention_mask is None or attention_mask.dim() == 2 else attention_mask.reshape(1, -1)
            )
            context = self._encode(ids, mask)
        else:
            context = None
        token = _CONTEXT.set(context)
        try:
            return super().generate(
                input_ids=input_ids, attention_mask=attention_mask, instruction_mask=instruction_mask, **kwargs
            )
        finally:
            _CONTEXT.reset(token)

    # ------------------------------------------------------------------ parameters
    def expected_parameter_count(self) -> int:
        hidden_size = self.adapter_config.base_hidden_size
        assert hidden_size is not None, "GeneratedPromptModel.__init__ records base_hidden_size"
        return generator_parameter_count(hidden_size, self.adapter_config)

    def rational_parameters(self) -> list[nn.Parameter]:
        return []  # no rational activations: the trainer uses one plain AdamW

    def generator_weight_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt_generator.parameters())

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (the generator only), atomically."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.prompt_generator.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        self.adapter_config.save(directory)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_path: str | os.PathLike, is_trainable: bool = False
    ) -> GeneratedPromptModel:
        """Install a saved IDPG / LPT adapter; refuses a base of another architecture or size."""
        directory = Path(adapter_path)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter folder {directory} does not exist")
        config = GeneratedPromptConfig.load(directory)
        # duck-typed: base_model_type / hidden size / layers of a Hugging Face model
        check_compatible(config, cast(PreTrainedModel, base_model), directory)
        weights_path(directory)
        model = cls(base_model, config)
        try:
            state = read_weights(directory, {k: tuple(v.shape) for k, v in model.prompt_generator.state_dict().items()})
        except ValueError:
            model.unload()
            raise
        model.prompt_generator.load_state_dict(state)
        model.prompt_generator.requires_grad_(is_trainable)
        return model


def get_generated_prompt_model(base_model: nn.Module, config: GeneratedPromptConfig) -> GeneratedPromptModel:
    """Freeze ``base_model`` and install an IDPG / LPT generator."""
    return GeneratedPromptModel(base_model, config)
