"""vLLM models that serve IAPT adapters: vLLM's own Llama / Mistral / Qwen2 / Gemma 3 (text) with a slot-writing
decoder layer.

Nothing of vLLM's modeling code is copied. Each decoder layer, before running vLLM's own, overwrites the
slots' hidden states with that layer's soft tokens, as IAPTModel's forward pre-hook does:

* the per-step plan (which flattened tokens are whose slots and instruction, which adapter) is built in the
  outer forward, which vLLM does not compile, from the input ids, positions and the step's
  ``query_start_loc`` (request boundaries). An IAPT request is recognised by its header at position 0
  (``protocol.py``); with chunked prefill off every prefill starts at position 0, and a header whose
  instruction is not whole in this step raises (never a silently wrong prompt);
* the write is an opaque custom op (``torch.ops.vllm.iapt_write_slots*``), so torch.compile keeps it as it
  is. It reads each IAPT request's instruction states, runs the project's :class:`AdapterBank` (one
  ``soft_prompts`` call per layer for the whole batch, anchors included) and writes the soft tokens, through
  the project's one slot mechanism (``iapt.slots``: a flattened :class:`SlotPlan`);
* vLLM's layers take ``(hidden, residual)`` and add them in their fused add-RMSNorm: the layer's input
  stream is ``hidden + residual``, so writing P into ``hidden`` and 0 into ``residual`` at the slots makes
  the norm see exactly P, and the generators read ``hidden + residual`` at the instruction. Gemma 3's layer
  adds them the same way (a fused add-GemmaRMSNorm), and vLLM scales its embeddings by sqrt(d) before layer 0
  as transformers does: what the generators read, and what the slots hold at a layer without a generator
  (the slot token's scaled embedding, then the layers' own states), are the offline model's.

Adapters (``additional_config={"iapt": ...}``, see ``iapt.vllm.IAPTServing``) are read and validated with
the project's ``read_adapter`` at load, against the base loaded once with transformers (also what
``anchor_states`` needs), then stacked into the bank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models import qwen2 as vllm_qwen2
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import direct_register_custom_op

from iapt.slots import SlotPlan, read_flat, write_flat_slots
from iapt.vllm.config import check_vllm_config, plugin_config
from iapt.vllm.protocol import MIN_SLOTS, Header

if TYPE_CHECKING:
    from iapt.serving.bank import AdapterBank

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the step plan
@dataclass
class _Step:
    """This step's IAPT requests (B of them) in the flattened batch: their bank rows and their slot plan."""

    bank: AdapterBank
    index: torch.Tensor  # (B,) adapter index (bank row)
    plan: SlotPlan  # flattened: slot token indices (B, N), instruction token indices ``rows`` (B, T)


_STEP: _Step | None = None  # set by the outer forward for the duration of one model call


@contextlib.contextmanager
def _replaced(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name`` is ``value`` inside (vLLM's model classes that take no layer type: while one is built)."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _running(step: _Step | None) -> Iterator[None]:
    global _STEP
    previous, _STEP = _STEP, step
    try:
        yield
    finally:
        _STEP = previous


def _write(hidden_states: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    step = _STEP
    if step is None:
        return
    plan = step.plan
    stream = read_flat(hidden_states, plan)  # (B, T, d)
    if residual is not None:
        stream = stream + read_flat(residual, plan)
    prompts, present = step.bank.soft_prompts(layer, step.index, stream, plan.pooled, plan.columns.shape[1])
    written = write_flat_slots(hidden_states, plan, prompts, present)  # rows without a generator here keep theirs
    if residual is not None and written.numel():
        residual[written] = 0


def iapt_write_slots(hidden_states: torch.Tensor, layer: int) -> None:
    _write(hidden_states, None, layer)


def iapt_write_slots_residual(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    _write(hidden_states, residual, layer)


def _fake_write(hidden_states: torch.Tensor, *args: object) -> None:
    return None


direct_register_custom_op("iapt_write_slots", iapt_write_slots, mutates_args=["hidden_states"], fake_impl=_fake_write)
direct_register_custom_op(
    "iapt_write_slots_residual",
    iapt_write_slots_residual,
    mutates_args=["hidden_states", "residual"],
    fake_impl=_fake_write,
)


def iapt_layer(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (a vLLM decoder layer) that first writes this layer's soft tokens into the slots."""

    class IAPTDecoderLayer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, prefix: str = "", **kwargs: object) -> None:
            super().__init__(*args, prefix=prefix, **kwargs)
            self.iapt_layer = extract_layer_index(prefix)

        def forward(
            self,
            positions: torch.Tensor,
            hidden_states: torch.Tensor,
            residual: torch.Tensor | None,
            *args: object,
            **kwargs: object,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if residual is None:
                torch.ops.vllm.iapt_write_slots(hidden_states, self.iapt_layer)
            else:
                torch.ops.vllm.iapt_write_slots_residual(hidden_states, residual, self.iapt_layer)
            return super().forward(positions, hidden_states, residual, *args, **kwargs)

    IAPTDecoderLayer.__name__ = IAPTDecoderLayer.__qualname__ = f"IAPT{base.__name__}"
    return IAPTDecoderLayer


def _check_layers(layers: nn.ModuleList, base: type[nn.Module]) -> None:
    """Every ``base`` layer of ``layers`` writes its slots (vLLM built ours): else refuse, never serve without them."""
    bare = [i for i, layer in enumerate(layers) if isinstance(layer, base) and not hasattr(layer, "iapt_layer")]
    if bare:
        raise RuntimeError(
            f"IAPT: vLLM built decoder layers {bare} as its own {base.__name__}, not IAPT's slot-writing one "
            "(a vLLM version the plugin does not know?); IAPT adapters cannot be served on it"
        )


# ------------------------------------------------------------------------------------------ the model side
class IAPTAdapters:
    """The adapters of one vLLM engine: validated, stacked in the project's AdapterBank, and the step planner."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        check_vllm_config(vllm_config)
        self.vllm_config = vllm_config
        self.spec = plugin_config(vllm_config)
        self.bank: AdapterBank | None = None
        self.header: Header | None = None
        self.names: dict[int, str] = {}  # header index -> adapter name (its bank row: bank.index[name])
        self.slot_token_id = 0

    def load(self, device: torch.device) -> None:
        """Read and validate every adapter against the base, compute anchors, stack the bank (at load time)."""
        from transformers import AutoModelForCausalLM

        from iapt.backbone import anchor_states, slot_token_id, text_config
        from iapt.serving.engine import AdapterBank, read_adapter

        model_config = self.vllm_config.model_config
        base = AutoModelForCausalLM.from_pretrained(
            model_config.model,
            dtype=model_config.dtype,
            revision=model_config.revision,
            trust_remote_code=model_config.trust_remote_code,
        ).eval()
        try:
            adapters = [read_adapter(base, path, name) for name, path in self.spec["adapters"].items()]
            anchors = {
                a.name: states.to(device) for a in adapters if (states := anchor_states(base, a.config)) is not None
            }
            text = text_config(base)
            self.bank = AdapterBank(adapters, text.hidden_size, text.num_hidden_layers, device, anchors)
            self.slot_token_id = slot_token_id(base)
            vocab = base.get_input_embeddings().weight.shape[0]
        finally:
            del base
        self.header = Header(int(self.spec["marker"]), vocab, [a.config.num_slots for a in adapters])
        self.names = {i: a.name for i, a in enumerate(adapters, start=1)}
        logger.info("IAPT: %d adapter(s) loaded: %s", len(adapters), ", ".join(a.name for a in adapters) or "none")

    def add(self, name: str, path: str, index: int) -> None:
        """Load adapter ``name`` at run time at header index ``index`` (``iapt_add_adapter``, between steps).

        The same checks as at load (``read_adapter``) on a weightless copy of the base; an anchored adapter's
        slot states need the base's weights, read from disk again for the call (the engine keeps none of its
        own in transformers' layout). The bank is extended into a new one (``AdapterBank.extended``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from iapt.backbone import anchor_states
        from iapt.serving.engine import read_adapter

        assert self.bank is not None and self.header is not None, "the model is loaded"
        if name in self.bank.index:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if index in self.names:
            raise ValueError(f"adapter index {index} is taken by {self.names[index]!r}")
        model_config = self.vllm_config.model_config
        hf_config = AutoConfig.from_pretrained(model_config.model, trust_remote_code=model_config.trust_remote_code)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf_config)
        adapter = read_adapter(meta, path, name)
        header = self.header.with_slots(index, adapter.config.num_slots)
        anchors = {}
        if adapter.config.anchor != "none":
            base = AutoModelForCausalLM.from_pretrained(
                model_config.model, dtype=model_config.dtype, trust_remote_code=model_config.trust_remote_code
            ).eval()
            try:
                states = anchor_states(base, adapter.config)
            finally:
                del base
            if states is not None:
                anchors[name] = states.to(self.bank.num_soft_tokens.device)
        self.bank = self.bank.extended([adapter], anchors)
        self.header, self.names[index] = header, name
        logger.info("IAPT: adapter %s loaded at index %d", name, index)

    def remove(self, name: str) -> None:
        """Unload adapter ``name`` (``iapt_remove_adapter``): the caller made sure no request of it is left."""
        assert self.bank is not None and self.header is not None, "the model is loaded"
        index = next((i for i, n in self.names.items() if n == name), None)
        if index is None:
            raise ValueError(f"no adapter named {name!r} is loaded")
        self.bank = self.bank.without(name)
        self.header = self.header.with_slots(index, 0)
        del self.names[index]
        logger.info("IAPT: adapter %s unloaded (index %d is free)", name, index)

    def plan(self, input_ids: torch.Tensor | None, positions: torch.Tensor) -> tuple[_Step | None, torch.Tensor | None]:
        """This step's plan (None: no IAPT request begins in it) and the input ids with the slots' ids."""
        if input_ids is None or self.header is None or not is_forward_context_available():
            return None, input_ids
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # a dummy (profiling / warm-up) run
            return None, input_ids
        if isinstance(metadata, list):
            raise RuntimeError("IAPT on vLLM does not support micro-batching (ubatching / DBO); turn it off")
        query_start = next(m.query_start_loc for m in metadata.values() if hasattr(m, "query_start_loc"))
        bounds = query_start.to("cpu").tolist()
        starts = torch.tensor(bounds[:-1], dtype=torch.long)
        ends = torch.tensor(bounds[1:], dtype=torch.long)
        nonempty = ends > starts
        if not bool(nonempty.any()):
            return None, input_ids
        first = starts.clamp_max(input_ids.shape[0] - 1).to(input_ids.device)
        begins = ((positions[first] == 0) & (input_ids[first] == self.header.marker)).to("cpu") & nonempty
        if not bool(begins.any()):
            return None, input_ids
        rows = []
        width = max(max(self.header.num_slots, default=0), MIN_SLOTS)
        for i in begins.nonzero().flatten().tolist():
            start, end = bounds[i], bounds[i + 1]
            head = input_ids[start : min(end, start + width)].tolist()
            index, n, length = self.header.decode(head)  # ValueError for a malformed header: never guess
            if end - start < n + length:
                raise RuntimeError(
                    f"an IAPT request (adapter index {index}) has only {end - start} of its {n} slots and "
                    f"{length}-token instruction in this step: its prefill was split (chunked prefill or a "
                    "token budget below the prompt). Serve with enable_chunked_prefill=False and "
                    "max_num_batched_tokens >= max_model_len"
                )
            rows.append((index, start, n, length))
        assert self.bank is not None, "the header is set only once the bank is loaded"
        device = input_ids.device
        max_len = max(max(r[3] for r in rows), 1)
        offsets = torch.arange(width, device=device)
        slot_start = torch.tensor([r[1] for r in rows], device=device)
        slot_n = torch.tensor([r[2] for r in rows], device=device)
        slot_valid = offsets[None] < slot_n[:, None]
        slot_rows = torch.where(slot_valid, slot_start[:, None] + offsets[None], slot_start[:, None])
        pool = torch.arange(max_len, device=device)
        lengths = torch.tensor([r[3] for r in rows], device=device)
        pool_mask = pool[None] < lengths[:, None]
        pool_rows = torch.where(pool_mask, (slot_start + slot_n)[:, None] + pool[None], slot_start[:, None])
        adapter_index = torch.tensor([self.bank.index[self.names[r[0]]] for r in rows], device=device)
        ids = input_ids.clone()
        ids[slot_rows[slot_valid]] = self.slot_token_id  # what IAPTModel feeds at its slots
        # The generators write each row's last num_soft_tokens slots; a sink column (IAPTConfig.sink_token)
        # in front of them keeps the slot token's own states.
        lead = self.bank.sink.index_select(0, adapter_index)
        soft = slot_n - lead
        soft_offsets = torch.arange(int(soft.max()), device=device)
        soft_valid = soft_offsets[None] < soft[:, None]
        soft_rows = torch.where(soft_valid, (slot_start + lead)[:, None] + soft_offsets[None], slot_start[:, None])
        plan = SlotPlan(columns=soft_rows, pooled=pool_mask, valid=soft_valid, rows=pool_rows)
        return _Step(self.bank, adapter_index, plan), ids


class _IAPTMixin:
    """The outer forward (not compiled): plan the step, then run vLLM's model with the plan in place."""

    iapt: IAPTAdapters

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):  # type: ignore[no-untyped-def]
        step, ids = self.iapt.plan(input_ids, positions)
        if step is not None and inputs_embeds is not None:
            raise RuntimeError("IAPT requests given as embeddings are not supported")
        with _running(step):
            # a mixin: super() is vLLM's model class it is mixed into
            return super().forward(ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # type: ignore[misc]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)  # type: ignore[misc]  # a mixin, as forward
        self.iapt.load(next(cast(nn.Module, self).parameters()).device)
        return loaded


class IAPTLlamaForCausalLM(_IAPTMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        iapt = IAPTAdapters(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=iapt_layer(LlamaDecoderLayer))
        self.iapt = iapt


class IAPTMistralForCausalLM(_IAPTMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        iapt = IAPTAdapters(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=iapt_layer(MistralDecoderLayer))
        self.iapt = iapt


class IAPTQwen2ForCausalLM(_IAPTMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        iapt = IAPTAdapters(vllm_config)
        # Qwen2ForCausalLM builds its Qwen2Model without a layer-type argument: give it ours while it does.
        original, layer = vllm_qwen2.Qwen2Model, iapt_layer(Qwen2DecoderLayer)
        with _replaced(vllm_qwen2, "Qwen2Model", lambda **kw: original(**kw, decoder_layer_type=layer)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        _check_layers(self.model.layers, Qwen2DecoderLayer)
        self.iapt = iapt


class IAPTGemma3ForCausalLM(_IAPTMixin, Gemma3ForCausalLM):
    """Gemma 3, text only (``Gemma3ForCausalLM``): sliding-window and global layers alike write their slots."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        iapt = IAPTAdapters(vllm_config)
        # Gemma3Model names its decoder layer's class when it builds each layer, and takes no layer type: it
        # builds ours while this runs. Built as ours (not re-classed afterwards), so a wrapper vLLM puts on a
        # layer's forward as it builds it (its CPU-offloading ones) wraps the slot write too.
        with _replaced(vllm_gemma3, "Gemma3DecoderLayer", iapt_layer(Gemma3DecoderLayer)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        _check_layers(self.model.layers, Gemma3DecoderLayer)
        self.iapt = iapt
