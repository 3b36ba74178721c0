"""IAPTModel: a frozen Hugging Face decoder with a prompt generator at every layer.

How the soft tokens get in, without copying any family's modeling code: the model is fed ``n`` reserved
slots in front of each row's tokens, after its left padding (positions 0..n-1, real tokens shifted by n). A
forward pre-hook on each decoder layer (``iapt.slots``) overwrites the slots' hidden states with that layer's
generated soft tokens, so layer l sees
``[P_l ; H]`` and every real token can attend to them; the next layer replaces them again. Masks, rotary
or absolute positions and the KV cache are the backbone's own. Generators run only at prefill (an empty
cache): during decoding the slots' keys and values already sit in the cache, so a decoded token costs the
bare backbone's work plus n cached positions.

The hooks act only inside IAPTModel's own ``forward`` and ``generate``: calling ``model.base_model``
directly runs the bare backbone. Users see none of the slots: logits are aligned with ``input_ids`` and
``generate`` returns the prompt followed by the new tokens, like transformers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from iapt.adapter_files import read_weights, weights_path
from iapt.backbone import (
    anchor_states,
    check_base,
    check_compatible,
    find_layers,
    generator_out_features,
    input_embeddings,
    kv_projections,
    output_scales,
    slot_token_id,
    text_config,
)
from iapt.config import WEIGHTS_NAME, IAPTConfig
from iapt.generator import PromptGenerator, generator_parameter_count
from iapt.io import atomic_write
from iapt.slots import SlotPlan, SlotWriter, insert_slots, slot_layout


def _instruction_mask(
    attention_mask: torch.Tensor, instruction_mask: torch.Tensor | None, labels: torch.Tensor | None
) -> torch.Tensor:
    """What the generators pool: explicit mask, else unlabelled attended tokens, else all attended tokens."""
    attended = attention_mask.bool()
    if instruction_mask is not None:
        if instruction_mask.shape != attention_mask.shape:
            raise ValueError(
                f"instruction_mask has shape {tuple(instruction_mask.shape)} but the input has "
                f"{tuple(attention_mask.shape)}; they must match (1 = instruction token to pool)"
            )
        return instruction_mask.bool() & attended
    if labels is not None:
        return (labels == -100) & attended
    return attended


def _warn_if_nothing_pooled(pooled: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """A row with tokens but nothing to pool would train prompts that know nothing of the instruction: say so."""
    empty = attention_mask.bool().any(1) & ~pooled.any(1)
    if bool(empty.any()):
        warnings.warn(
            f"IAPT: {int(empty.sum())} of {len(empty)} rows have no instruction token to pool: every token of them is "
            "labelled. The generators pool the unlabelled (-100) tokens; train on prompt/completion data (labels "
            "-100 on the prompt), set assistant_only_loss / completion_only_loss in TRL, or pass instruction_mask.",
            stacklevel=3,
        )


@dataclass
class SlotCall:
    """One IAPTModel call (forward or generate): what to pool and where the slots are, and the plan of the
    backbone step running now (None during decode steps). Lives in the slot writer's session."""

    pooled: torch.Tensor | None  # (B, T) the instruction, over the input without slots
    is_slot: torch.Tensor | None  # (B, T + n) the slot columns of the input with slots (None: a decode call)
    plan: SlotPlan | None = None
    past_length: int = 0  # tokens (slots included) in the cache when the current backbone step began
    context: torch.Tensor | None = None  # (B, T, d) what a generator reads instead of hidden states (IDPG)


class IAPTModel(nn.Module):
    """A causal LM whose frozen layers each read ``n`` soft tokens written by their own prompt generator."""

    slots_after_padding = True  # [padding | slots | tokens]; subclasses that index slots as columns 0..n-1: False
    sink_columns = 0  # IAPTConfig.sink_token: plain slot-token columns before the soft tokens, never written
    _disabled = False  # True inside disable_adapter(): forward and generate run the bare backbone
    insertion = "hidden"  # IAPTConfig.insertion; subclasses (IDPG, LPT) write hidden states

    def __init__(self, base_model: PreTrainedModel, config: IAPTConfig | None = None) -> None:
        super().__init__()
        config = IAPTConfig() if config is None else config
        check_base(base_model)
        text = text_config(base_model)
        hidden_size, num_layers = text.hidden_size, text.num_hidden_layers
        decoder_layers = find_layers(base_model, config.layers_path)
        layer_ids = list(range(len(decoder_layers))) if config.layers is None else sorted(set(config.layers))
        bad = [i for i in layer_ids if not 0 <= i < len(decoder_layers)]
        if bad:
            raise ValueError(f"IAPTConfig.layers has {bad}, but the model has layers 0..{len(decoder_layers) - 1}")

        config.base_model_type = base_model.config.model_type
        config.base_hidden_size = hidden_size
        config.base_num_layers = num_layers
        config.base_model_name_or_path = (
            config.base_model_name_or_path or getattr(base_model.config, "_name_or_path", None) or None
        )

        for p in base_model.parameters():
            p.requires_grad_(False)
        self.base_model = base_model
        self.iapt_config = config
        self.num_soft_tokens = config.num_soft_tokens
        self.sink_columns = int(config.sink_token)
        self.slot_token_id = slot_token_id(base_model)
        device = input_embeddings(base_model).weight.device
        self.insertion = config.insertion
        out_features = generator_out_features(base_model, config)
        self.generators = nn.ModuleDict(
            {str(i): PromptGenerator(hidden_size, config, out_features).to(device) for i in layer_ids}
        )
        anchors = anchor_states(base_model, config)
        scales = output_scales(config, anchors)
        if anchors is not None:
            for i in layer_ids:  # what each generator's output is added to (IAPTConfig.anchor)
                self.generators[str(i)].register_buffer("anchor", anchors[i], persistent=False)
                if scales is not None:  # and what it is multiplied by first (IAPTConfig.output_scale)
                    self.generators[str(i)].register_buffer("output_scale", scales[i], persistent=False)
        elif len(layer_ids) < len(decoder_layers):
            # With generators on some layers only, the slots flow on through the generator-less layers above.
            # Zero soft tokens would stay exactly zero there, and each norm's gradient at zero is 1/sqrt(eps):
            # through many layers it overflows to NaN. Start these up-projections at nn.Linear's default.
            for generator in self.generators.values():
                cast(PromptGenerator, generator).up.reset_parameters()
        self._hooks = [base_model.register_forward_pre_hook(self._before_backbone, with_kwargs=True)]
        if self.insertion == "kv":
            for i in layer_ids:  # first of the layer's hooks: a decode step (no plan) must not reuse a prefill's
                layer_generator = cast(PromptGenerator, self.generators[str(i)])
                self._hooks.append(
                    decoder_layers[i].register_forward_pre_hook(
                        functools.partial(self._clear_pending, layer_generator), prepend=True
                    )
                )
                k_proj, v_proj = kv_projections(decoder_layers[i])
                for projection, part in (
                    (k_proj, slice(0, k_proj.out_features)),
                    (v_proj, slice(k_proj.out_features, None)),
                ):
                    hook = functools.partial(self._after_projection, layer_generator, part)
                    self._hooks.append(projection.register_forward_hook(hook))
        self.slot_writer = SlotWriter({i: decoder_layers[i] for i in layer_ids}, self._soft_tokens)

    # ------------------------------------------------------------------ hooks
    def _before_backbone(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Decide, once per backbone call, whether this is a prefill (generators run) or a decode step."""
        call = self.slot_writer.state
        if call is None:
            return None
        cache = kwargs.get("past_key_values")
        call.past_length = cache.get_seq_length() if cache is not None else 0
        source = kwargs.get("input_ids")
        if source is None:
            source = kwargs.get("inputs_embeds")
        if source is None and args:
            source = args[0]
        assert source is not None, "the backbone is called with input_ids or inputs_embeds"
        batch, length = source.shape[0], source.shape[1]
        attention_mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and attention_mask is not None and attention_mask.dim() == 2:
            # Positions from the mask, so a left-padded row sees the positions it would see alone. (Without
            # a mask, generate has dropped it for want of padding: the backbone's own arange is right.)
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            kwargs["position_ids"] = positions[:, -length:]
        if call.past_length > 0 or call.is_slot is None:
            call.plan = None
            return args, kwargs
        is_slot = call.is_slot
        if is_slot.shape[0] != batch:  # generate expanded rows for beams / num_return_sequences
            is_slot = is_slot.repeat_interleave(batch // is_slot.shape[0], dim=0)
        if is_slot.shape[1] < length:  # no-cache generation: the tokens generated so far come after the slots
            is_slot = torch.nn.functional.pad(is_slot, (0, length - is_slot.shape[1]), value=False)
        is_slot = is_slot.to(source.device)
        real = ~is_slot if attention_mask is None or attention_mask.dim() != 2 else attention_mask.bool() & ~is_slot
        mask = call.pooled
        if mask is not None:
            n = self.num_slots
            if mask.shape[0] != batch:  # generate expanded rows for beams / num_return_sequences
                mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
            # Column n + c holds input token c of every row (only padding sits before a row's slots).
            mask = torch.nn.functional.pad(mask.to(real.device), (n, 0), value=False)
            if mask.shape[1] < length:  # no-cache generation: tokens generated so far are not pooled
                mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)
            real = real & mask[:, :length]
        plan = SlotPlan.contiguous(is_slot, real, self.num_slots)
        call.plan = SlotPlan(plan.columns[:, self.sink_columns :], plan.pooled) if self.sink_columns else plan
        return args, kwargs

    def _soft_tokens(self, layer: int, hidden: torch.Tensor, call: SlotCall) -> tuple[torch.Tensor, None]:
        """The slot writer's source: layer ``layer``'s soft tokens for this prefill."""
        generator = cast(PromptGenerator, self.generators[str(layer)])
        plan = call.plan
        assert plan is not None, "the slot writer asks for soft tokens at prefills only"
        prompts = generator(hidden, plan.pooled)
        anchor = getattr(generator, "anchor", None)
        if self.insertion == "kv":
            # The slots hold the anchor (or zero) states; the generator's output goes to their keys and values
            # (_after_projection), kept with the slot columns until this layer's projections run (and run again
            # under gradient checkpointing's recomputation, after the call).
            generator.pending = (prompts, plan.columns)
            prompts = (
                anchor.expand(hidden.shape[0], -1, -1)
                if anchor is not None
                else hidden.new_zeros(hidden.shape[0], self.num_soft_tokens, hidden.shape[-1])
            )
        elif anchor is not None:
            scale = getattr(generator, "output_scale", None)
            prompts = (prompts if scale is None else prompts * scale) + anchor
        return prompts, None

    def _clear_pending(self, generator: PromptGenerator, module: nn.Module, args: tuple) -> None:
        generator.pending = None

    def _after_projection(
        self, generator: PromptGenerator, part: slice, module: nn.Module, args: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        """``insertion='kv'``: add the generator's keys (or values) to this projection's output at the slots."""
        pending = getattr(generator, "pending", None)
        if pending is None:
            return None  # a decode step: the slots' keys and values are in the cache already
        delta, columns = pending
        columns = columns[..., None].expand(-1, -1, output.shape[-1])
        return output.scatter_add(1, columns, delta[..., part].to(output.dtype))

    @contextlib.contextmanager
    def _slots(self, instruction_mask: torch.Tensor | None, is_slot: torch.Tensor | None) -> Iterator[SlotCall]:
        with self.slot_writer.session(SlotCall(instruction_mask, is_slot)) as call:
            yield call

    @property
    def num_slots(self) -> int:
        """Slot columns in front of each row: the soft tokens, plus the sink column (``IAPTConfig.sink_token``)."""
        return self.num_soft_tokens + self.sink_columns

    @property
    def prefilling(self) -> bool:
        """True while the backbone runs a prefill of this model's call (the generators write the slots)."""
        return self.slot_writer.plan is not None

    # ------------------------------------------------------------------ forward / generate
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
    ) -> ModelOutput:
        """Like the base model's forward, on inputs without slots; ``instruction_mask`` picks what is pooled.

        ``labelled_logits_only=True`` (with ``labels``) computes logits only at the positions that predict a
        label: same loss, much less work when responses are short; ``out.logits`` then holds those positions.

        Without ``instruction_mask``, the instruction is the attended tokens whose label is -100 when
        ``labels`` are given, else every attended token. With a non-empty ``past_key_values`` (a cache
        returned by an earlier call) this is a decode step: pass the attention mask of everything so far,
        without slots, and no generator runs.
        """
        if self._disabled:  # disable_adapter(): the bare backbone, on the same inputs
            for key in ("labelled_logits_only", "fused_lm_head"):
                kwargs.pop(key, None)
            return self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        source = input_ids if input_ids is not None else inputs_embeds
        assert source is not None, "exactly one of input_ids and inputs_embeds was given"
        batch, length = source.shape[0], source.shape[1]
        device = source.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if labels is not None and labels.shape != (batch, length):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(batch, length)} like input_ids")
        n = self.num_slots
        source_columns, is_slot = slot_layout(attention_mask, n, self.slots_after_padding)
        full_mask = insert_slots(attention_mask, source_columns, is_slot, 1)
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        if decoding:
            expected = past_key_values.get_seq_length() + length
            if full_mask.shape[1] != expected:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens but the cache holds "
                    f"{past_key_values.get_seq_length() - n} earlier tokens plus {length} new ones: pass the mask "
                    f"of all tokens so far (without IAPT's {n} soft-token slots)"
                )
            pooled = None
        else:
            pooled = _instruction_mask(attention_mask, instruction_mask, labels)
            if input_ids is not None:
                input_ids = cast(torch.LongTensor, insert_slots(input_ids, source_columns, is_slot, self.slot_token_id))
            else:
                assert inputs_embeds is not None, "exactly one of input_ids and inputs_embeds was given"
                inputs_embeds = insert_slots(inputs_embeds, source_columns, is_slot, 0.0)
                slot_embedding = input_embeddings(self.base_model).weight[self.slot_token_id]
                # the slot token's embedding, as input_ids would give (what a column no generator writes keeps)
                inputs_embeds = torch.where(is_slot[..., None], slot_embedding.to(inputs_embeds.dtype), inputs_embeds)
            # Project only columns n: (every token's column, see _before_layer): no logits for n slots.
            kwargs.setdefault("logits_to_keep", length)
        if labels is not None and instruction_mask is None and pooled is not None:  # pooled is None when decoding
            _warn_if_nothing_pooled(pooled, attention_mask)
        if kwargs.get("fused_lm_head") and not decoding:
            return self._fused_forward(
                input_ids,
                inputs_embeds,
                full_mask,
                labels,
                pooled,
                source_columns,
                is_slot,
                past_key_values,
                position_ids,
                kwargs,
            )
        labelled_only = bool(kwargs.pop("labelled_logits_only", False)) and labels is not None and not decoding
        if labelled_only:
            # Training fast path: project onto the vocabulary only the positions that predict a label. With
            # short responses this skips most of the lm_head's work (49k x 576 per token for SmolLM2).
            assert labels is not None, "labelled_only implies labels"
            predicts = (labels[:, 1:] != -100).any(0).nonzero().flatten()
            kwargs["logits_to_keep"] = predicts + n
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        if labels is not None:
            kwargs.setdefault("use_cache", False)  # training needs no cache
        with self._slots(pooled, None if decoding else is_slot):
            out = self.base_model(
                input_ids=input_ids,
                attention_mask=full_mask,
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        if not decoding:
            if out.logits is not None and out.logits.shape[1] == length + n:
                out.logits = out.logits[:, n:]
            if getattr(out, "hidden_states", None) is not None:
                out.hidden_states = tuple(h[:, n:] for h in out.hidden_states)
        if labelled_only:
            assert labels is not None, "labelled_only implies labels"
            targets = labels[:, predicts + 1]
            out.loss = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        elif labels is not None:
            if out.logits.shape[1] != length:
                raise ValueError("labels need logits for every position; do not combine them with logits_to_keep")
            out.loss = self.base_model.loss_function(
                logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1], **loss_kwargs
            )
        return out

    def _fused_forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        full_mask: torch.Tensor,
        labels: torch.Tensor | None,
        pooled: torch.Tensor | None,
        source_columns: torch.Tensor,
        is_slot: torch.Tensor,
        past_key_values: Any,
        position_ids: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> ModelOutput:
        """TRL's fused LM head (``SFTTrainer`` patches the backbone's forward and calls it with ``fused_lm_head=True``):
        the labels get -100 at the slots, the backbone's fused loss counts the real labels only, and its per-token
        outputs (``(B, T + n - 1)``: position j predicts j + 1) lose the n slot columns, as logits do."""
        n = self.num_slots
        for key in ("labels", "shift_labels"):
            value = labels if key == "labels" else kwargs.get(key)
            if value is not None:
                kwargs[key] = insert_slots(value, source_columns, is_slot, -100)
        kwargs.setdefault("use_cache", False)
        with self._slots(pooled, is_slot):
            out = self.base_model(
                input_ids=input_ids,
                attention_mask=full_mask,
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        width = full_mask.shape[1] - (0 if kwargs.get("shift_labels") is not None else 1)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == width:
                out[key] = value[:, n:]
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | ModelOutput:
        """transformers' ``generate`` (greedy, sampling, beam search, ...) with the soft tokens in place.

        Pad on the left. Returns the prompt followed by the new tokens, as transformers does; the slots
        never appear. ``max_length`` / ``min_length`` count real tokens only.
        """
        # The base is a causal LM (check_base): PreTrainedModel alone does not declare generate. The ignores below:
        # transformers types generate's self as a protocol that mypy finds no model matches (LlamaForCausalLM neither)
        backbone = cast(GenerationMixin, self.base_model)
        if self._disabled:
            return backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]
        if input_ids is None:
            raise ValueError("IAPTModel.generate needs input_ids (inputs_embeds-only generation is not supported)")
        if input_ids.dim() == 1:
            input_ids = cast(torch.LongTensor, input_ids.unsqueeze(0))
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        n = self.num_slots
        pooled = _instruction_mask(attention_mask, instruction_mask, None)
        generation_config = kwargs.get("generation_config") or self.base_model.generation_config
        for key in ("max_length", "min_length"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = kwargs[key] + n
        if (
            kwargs.get("max_new_tokens") is None
            and getattr(generation_config, "max_new_tokens", None) is None
            and "max_length" not in kwargs
        ):
            kwargs["max_length"] = generation_config.max_length + n
        source_columns, is_slot = slot_layout(attention_mask, n, self.slots_after_padding)
        with self._slots(pooled, is_slot):
            out = backbone.generate(  # type: ignore[misc]
                input_ids=insert_slots(input_ids, source_columns, is_slot, self.slot_token_id),
                attention_mask=insert_slots(attention_mask, source_columns, is_slot, 1),
                **kwargs,
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        slot = is_slot.repeat_interleave(sequences.shape[0] // batch, dim=0).to(sequences.device)
        slot = torch.nn.functional.pad(slot, (0, sequences.shape[1] - slot.shape[1]), value=False)
        # every row drops exactly its n slots
        sequences = cast(torch.LongTensor, sequences[~slot].view(sequences.shape[0], -1))
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count, over backbone and generators (the backbone's own would say 0 trainable)."""
        embeddings = (
            {id(p) for p in self.base_model.get_input_embeddings().parameters()} if exclude_embeddings else set()
        )
        return sum(
            p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in embeddings
        )

    def get_base_model(self) -> PreTrainedModel:
        """The backbone (PEFT's name for it); calling it runs the bare model."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside, forward and generate run the bare backbone (PEFT's ``disable_adapter``)."""
        was = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = was

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload IAPT adapter",
        private: bool | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload the adapter folder (config + generator weights), never the backbone."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, **kwargs)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def expected_parameter_count(self) -> int:
        """2·d·r + r·n + 12 (+ r + d biases) per generator, summed over the layers that have one."""
        hidden_size = self.iapt_config.base_hidden_size
        assert hidden_size is not None, "IAPTModel.__init__ records base_hidden_size"
        return len(self.generators) * generator_parameter_count(
            hidden_size, self.iapt_config, generator_out_features(self.base_model, self.iapt_config)
        )

    def rational_parameters(self) -> list[nn.Parameter]:
        """The rational coefficients Θ (the 'architecture' of bi-level training)."""
        return [p for g in self.generators.values() for p in cast(PromptGenerator, g).activation.parameters()]

    def generator_weight_parameters(self) -> list[nn.Parameter]:
        """Everything trainable but Θ: projections and pooling queries (the 'weights' Ω)."""
        theta = {id(p) for p in self.rational_parameters()}
        return [p for p in self.generators.parameters() if id(p) not in theta]

    def unload(self) -> PreTrainedModel:
        """Remove the hooks and give the untouched backbone back."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.slot_writer.remove()
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (generators only), atomically."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.generators.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        self.iapt_config.save(directory)

    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel, adapter_path: str | os.PathLike, is_trainable: bool = False
    ) -> IAPTModel:
        """Install a saved adapter on ``base_model``; refuses a base of another architecture or size."""
        directory = Path(adapter_path)
        if not directory.is_dir():
            raise FileNotFoundError(f"adapter folder {directory} does not exist")
        config = IAPTConfig.load(directory)
        check_compatible(config, base_model, directory)
        weights_path(directory)  # before building: a folder without weights is refused first
        model = cls(base_model, config)
        try:
            state = read_weights(directory, {k: tuple(v.shape) for k, v in model.generators.state_dict().items()})
        except ValueError:
            model.unload()
            raise
        model.generators.load_state_dict(state)
        model.generators.requires_grad_(is_trainable)
        return model


def get_iapt_model(model: PreTrainedModel, config: IAPTConfig | None = None) -> IAPTModel:
    """Freeze ``model`` and install a prompt generator at every layer (PEFT's ``get_peft_model`` for IAPT)."""
    return IAPTModel(model, config)
