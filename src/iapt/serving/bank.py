"""The adapter bank: every loaded tenant's IAPT generators stacked, one generator call per layer for a batch.

An adapter folder is read and validated once (:func:`read_adapter`: the same checks as
``IAPTModel.from_pretrained``, weights checked from the file's header and for NaN/Inf), then its weights go
straight into the bank's rows (:class:`AdapterBank`, leading dim = adapter index, every adapter padded to the
largest r and n loaded), so N adapters are never held twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from iapt.adapter_files import validate_weights
from iapt.adapters import adapter_type, resolve_adapter_dir
from iapt.backbone import check_compatible, output_scales, text_config
from iapt.config import IAPTConfig
from iapt.generator import PromptGenerator, soft_prompts

_WEIGHTS = ("down_weight", "down_bias", "queries", "numerator", "denominator", "up_weight", "up_bias")


@dataclass
class Adapter:
    """One tenant's IAPT adapter on disk, validated: its config, and where its generator weights are.

    The weights are read only when the engine stacks them into its :class:`AdapterBank` (``load_weights``),
    straight into the bank's rows, so an adapter is held in memory once and loading N of them never holds N
    transient copies.
    """

    name: str
    path: Path
    config: IAPTConfig
    layer_ids: list[int]
    weights_file: Path

    def load_weights(self) -> dict[int, dict[str, torch.Tensor | None]]:
        """Layer index -> _WEIGHTS (float32; a missing bias is None), read from the (validated) file."""
        try:
            state = load_file(str(self.weights_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"adapter weights {self.weights_file} became unreadable: {exc}") from None
        return {
            i: {
                key: (state[f"{i}.{stored}"].float() if f"{i}.{stored}" in state else None)
                for key, stored in _STORED.items()
            }
            for i in self.layer_ids
        }


_STORED = {
    "down_weight": "down.weight",
    "down_bias": "down.bias",
    "queries": "queries",
    "numerator": "activation.numerator",
    "denominator": "activation.denominator",
    "up_weight": "up.weight",
    "up_bias": "up.bias",
}


def read_adapter(base_model: PreTrainedModel, path: str | Path, name: str | None = None) -> Adapter:
    """Read and validate an IAPT adapter folder for ``base_model``, without touching the model.

    Uses the same checks as ``IAPTModel.from_pretrained`` (same base architecture, hidden size and layer
    count; weights matching the config: names and shapes, read from the file's header) but installs no
    hooks, so it is safe while another thread runs the backbone; the weights themselves are not loaded yet.
    """
    directory = resolve_adapter_dir(path)
    kind = adapter_type(directory)
    if kind != "IAPT":
        raise ValueError(
            f"adapter {directory} is a {kind} adapter; only IAPT adapters are served by the built-in "
            f"engine (serve {kind} adapters with vLLM or PEFT)"
        )
    config = IAPTConfig.load(directory)
    check_compatible(config, base_model, directory)
    if config.insertion != "hidden":
        raise ValueError(
            f"adapter {directory} writes keys and values (insertion={config.insertion!r}), which the "
            "built-in engine does not serve yet; serve it offline with IAPTModel.generate, or retrain "
            "with insertion='hidden'"
        )
    text = text_config(base_model)
    num_layers = text.num_hidden_layers
    layer_ids = list(range(num_layers)) if config.layers is None else sorted(set(config.layers))
    if any(not 0 <= i < num_layers for i in layer_ids):
        raise ValueError(f"adapter {directory} has generators at layers {layer_ids}, the base has {num_layers}")
    one = {k: tuple(v.shape) for k, v in PromptGenerator(text.hidden_size, config).state_dict().items()}
    expected = {f"{i}.{k}": shape for i in layer_ids for k, shape in one.items()}
    # From the header, and the values one tensor at a time (NaN/Inf weights would fail every sampled request).
    weights_file = validate_weights(directory, expected, finite=True)
    name = name or (directory.parent.name if directory.name == "adapter" else directory.name)
    return Adapter(name, directory, config, layer_ids, weights_file)


def _shapes(d: int, r: int, n: int) -> dict[str, tuple[int, ...]]:
    return {
        "down_weight": (r, d),
        "down_bias": (r,),
        "queries": (r, n),
        "numerator": (7,),
        "denominator": (5,),
        "up_weight": (d, r),
        "up_bias": (d,),
        "anchor": (n, d),
        "scale": (n, 1),
    }


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad every dimension but the first up to ``shape`` (exact for the bank: see AdapterBank)."""
    if list(t.shape[1:]) == list(shape):
        return t
    out = t.new_zeros((t.shape[0], *shape))
    out[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
    return out


class AdapterBank:
    """Every loaded adapter's generator weights, stacked per layer so a batch gathers them by index.

    Index 0 is "no adapter" (the bare backbone). Adapters may differ in bottleneck r, slot count n and
    which layers have a generator: weights are zero-padded to the largest r and n, which is exact (padded
    bottleneck channels are zero going in and have zero up-projection weights going out; soft tokens past
    a row's own n are never written), and ``present`` says which rows have a generator at a layer.
    """

    def __init__(
        self,
        adapters: Sequence[Adapter],
        hidden_size: int,
        num_layers: int,
        device: torch.device,
        anchors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``anchors``: name -> (layers, n, d) slot states of each anchored adapter (:func:`iapt.model.anchor_states`),
        added to its generators' output (multiplied first by :func:`iapt.backbone.output_scales`, 1 without
        ``output_scale``); adapters without an entry start from zero."""
        anchors = anchors or {}
        self.names = [a.name for a in adapters]
        self.index = {name: i + 1 for i, name in enumerate(self.names)}
        count = len(adapters) + 1
        self.num_soft_tokens = torch.tensor([0] + [a.config.num_soft_tokens for a in adapters], device=device)
        # a sink column before the soft tokens, never written (IAPTConfig.sink_token): 1, else 0
        self.sink = torch.tensor([0] + [int(a.config.sink_token) for a in adapters], device=device)
        self.bottlenecks = [0] + [a.config.bottleneck for a in adapters]
        self.modes = [("attention", True)] + [(a.config.pooling, a.config.input_norm) for a in adapters]
        r = max([a.config.bottleneck for a in adapters], default=1)
        n = max([a.config.num_soft_tokens for a in adapters], default=1)
        shapes = _shapes(hidden_size, r, n)
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            stacked = {k: torch.zeros((count, *s), dtype=torch.float32, device=device) for k, s in shapes.items()}
            self.layers.append({**stacked, "present": torch.zeros(count, dtype=torch.bool, device=device)})
        for a_idx, adapter in enumerate(adapters, start=1):
            scales = output_scales(adapter.config, anchors.get(adapter.name))
            unit = torch.ones(adapter.config.num_soft_tokens, 1)  # the paper's output, as it is
            for layer, weights in adapter.load_weights().items():  # one adapter's weights in memory at a time
                bank = self.layers[layer]
                bank["present"][a_idx] = True
                if adapter.name in anchors:  # zero for unanchored rows: adding it changes nothing
                    weights["anchor"] = anchors[adapter.name][layer]
                weights["scale"] = unit if scales is None else scales[layer]
                for key, value in weights.items():
                    if value is not None:
                        where: tuple[int | slice, ...] = (a_idx, *[slice(0, s) for s in value.shape])
                        bank[key][where] = value

    def extended(self, adapters: Sequence[Adapter], anchors: Mapping[str, torch.Tensor] | None = None) -> AdapterBank:
        """A new bank with ``adapters`` appended; this one is left as it is (a prefill may be reading it).

        Costs one copy of the bank, however many adapters are added: load a folder with one call, not one
        call per adapter.
        """
        if not adapters:
            return self
        added = AdapterBank(
            adapters,
            self.layers[0]["up_weight"].shape[1] if self.layers else 1,
            len(self.layers),
            self.num_soft_tokens.device,
            anchors,
        )
        if not self.names:
            return added  # nothing to merge: no second copy
        merged = AdapterBank.__new__(AdapterBank)
        merged.names = self.names + added.names
        merged.index = {name: i + 1 for i, name in enumerate(merged.names)}
        merged.num_soft_tokens = torch.cat([self.num_soft_tokens, added.num_soft_tokens[1:]])
        merged.sink = torch.cat([self.sink, added.sink[1:]])
        merged.bottlenecks = self.bottlenecks + added.bottlenecks[1:]
        merged.modes = self.modes + added.modes[1:]
        merged.layers = []
        for mine, theirs in zip(self.layers, added.layers, strict=True):
            layer = {}
            for key, value in mine.items():
                shape = [max(a, b) for a, b in zip(value.shape[1:], theirs[key].shape[1:], strict=True)]
                layer[key] = torch.cat([_pad_to(value, shape), _pad_to(theirs[key][1:], shape)])
            merged.layers.append(layer)
        return merged

    def without(self, name: str) -> AdapterBank:
        """A new bank without adapter ``name``, padded only to the largest r and n the others need.

        Cut down, not just copied: after a large adapter is unloaded its memory (and the cost of gathering
        its padding at every prefill) is given back.
        """
        keep = [0] + [i for n, i in self.index.items() if n != name]
        rows = torch.tensor(keep, device=self.num_soft_tokens.device)
        smaller = AdapterBank.__new__(AdapterBank)
        smaller.names = [n for n in self.names if n != name]
        smaller.index = {n: i + 1 for i, n in enumerate(smaller.names)}
        smaller.num_soft_tokens = self.num_soft_tokens.index_select(0, rows)
        smaller.sink = self.sink.index_select(0, rows)
        smaller.bottlenecks = [self.bottlenecks[i] for i in keep]
        smaller.modes = [self.modes[i] for i in keep]
        r = max(smaller.bottlenecks[1:], default=1)
        n = max(smaller.num_soft_tokens[1:].tolist(), default=1)
        cut = {
            "down_weight": (slice(0, r),),
            "down_bias": (slice(0, r),),
            "queries": (slice(0, r), slice(0, n)),
            "up_weight": (slice(None), slice(0, r)),
            "anchor": (slice(0, n),),
            "scale": (slice(0, n),),
        }
        smaller.layers = [
            {k: v[(slice(None), *cut.get(k, ()))].index_select(0, rows) for k, v in layer.items()}
            for layer in self.layers
        ]  # index_select copies only the view: the rest is freed
        return smaller

    def soft_prompts(
        self, layer: int, adapter_index: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, num_soft_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft tokens ``(B, num_soft_tokens, d)`` of ``layer`` for rows using adapters ``adapter_index`` ``(B,)``.

        One ``soft_prompts`` call for the whole batch (one per distinct pooling mode). Also returns which
        rows have a generator at this layer; the others keep their slots' hidden states.
        """
        bank = self.layers[layer]
        present = bank["present"].index_select(0, adapter_index)
        modes = [self.modes[i] for i in adapter_index.tolist()]

        def run(mode: tuple[str, bool], idx: torch.Tensor, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            w = {k: bank[k].index_select(0, idx) for k in _WEIGHTS}
            tokens = soft_prompts(
                h,
                m,
                w["down_weight"],
                w["down_bias"],
                w["queries"][..., :num_soft_tokens],
                w["numerator"],
                w["denominator"],
                w["up_weight"],
                w["up_bias"],
                pooling=mode[0],
                input_norm=mode[1],
            )
            scale = bank["scale"].index_select(0, idx)[:, :num_soft_tokens]
            return tokens * scale + bank["anchor"].index_select(0, idx)[:, :num_soft_tokens]

        groups = dict.fromkeys(modes)
        if len(groups) == 1:  # one pooling mode (the usual case): the whole batch at once, no copies of its rows
            return run(modes[0], adapter_index, hidden, mask), present
        out = hidden.new_zeros(hidden.shape[0], num_soft_tokens, hidden.shape[-1], dtype=torch.float32)
        for mode in groups:
            rows = torch.tensor([i for i, m in enumerate(modes) if m == mode], device=hidden.device)
            out[rows] = run(
                mode, adapter_index.index_select(0, rows), hidden.index_select(0, rows), mask.index_select(0, rows)
            )
        return out, present
