"""The soft-token slot mechanism, once: where a batch's slots go, and the hooks that write them at prefill.

Four users share it: ``IAPTModel`` (a generator per layer), IDPG/LPT (``baselines/generated.py``: one generator
at one layer), the serving ``Engine`` (every tenant's generators stacked in one bank) and the vLLM plugin
(``iapt.vllm.model``: the same bank on vLLM's flattened batch, :func:`read_flat` / :func:`write_flat_slots`).
Each lays out its batch with slots (:func:`slot_layout`, or its own per-row layout), describes one prefill by a
:class:`SlotPlan`, and gives a :class:`SlotWriter` a *source*:
``(layer, hidden, state) -> (soft tokens, rows that have them)``.

Per-call state lives in a context variable (one per thread, and per asyncio task), never in instance fields or
thread ids: a writer's hooks act only inside its own :meth:`SlotWriter.session`, so another thread's forward on
the same backbone, or the bare backbone called directly, is left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn


def slot_layout(attention_mask: torch.Tensor, n: int, after_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's n slots go: just before its first attended token, after any left padding.

    A row is then ``[padding | slots | tokens]``, laid out exactly as it would be alone: same positions, and
    the same distances between its tokens and its slots, which sliding-window attention depends on.
    Returns ``source`` (B, T+n): the input column each new column copies (slots: any) and ``is_slot`` (B, T+n).
    ``after_padding=False`` puts every row's slots in front.
    """
    length = attention_mask.shape[1]
    attended = attention_mask.bool()
    first = torch.where(attended.any(1), attended.long().argmax(1), 0)  # no attended token: slots in front
    if not after_padding:
        first = torch.zeros_like(first)
    j = torch.arange(length + n, device=attention_mask.device)
    start = first[:, None]
    is_slot = (j >= start) & (j < start + n)
    source = torch.where(j < start, j, j - n).clamp(0, max(length - 1, 0))
    return source, is_slot


def insert_slots(t: torch.Tensor, source: torch.Tensor, is_slot: torch.Tensor, fill: float) -> torch.Tensor:
    """``t`` (B, T) or (B, T, d) with ``fill`` in the slot columns given by :func:`slot_layout`."""
    if t.dim() == 2:
        return t.gather(1, source).masked_fill(is_slot, fill)
    return t.gather(1, source[..., None].expand(-1, -1, t.shape[-1])).masked_fill(is_slot[..., None], fill)


@dataclass(frozen=True)
class SlotPlan:
    """One prefill: where each row's slots are among the hidden-state columns, and what the generators read."""

    columns: torch.Tensor  # (B, N) the column of row b's slot k
    pooled: torch.Tensor  # (B, W) over the hidden columns: the instruction tokens (never slots or padding)
    valid: torch.Tensor | None = None  # (B, N) False past a row's own slot count (tenants of different n)
    # A flattened batch (vLLM: every request's tokens in one (T, d) sequence) has no rows of its own: ``rows``
    # (B, W) gives the token index of row b's column w (what ``pooled`` is over), and ``columns`` are token indices.
    rows: torch.Tensor | None = None

    @classmethod
    def contiguous(cls, is_slot: torch.Tensor, pooled: torch.Tensor, n: int) -> SlotPlan:
        """Each row's n slots in one run of columns (``is_slot`` (B, W), as :func:`slot_layout` makes them)."""
        start = is_slot.long().argmax(1, keepdim=True)
        return cls(start + torch.arange(n, device=is_slot.device), pooled)


def write_slots(
    hidden: torch.Tensor, plan: SlotPlan, prompts: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden`` with ``prompts`` (B, N, d) at the plan's slot columns; rows not ``present`` (B,) and slots past a
    row's own count keep what they held."""
    columns = plan.columns[..., None].expand(-1, -1, hidden.shape[-1])
    prompts = prompts.to(hidden.dtype)
    keep = plan.valid
    if present is not None:
        keep = present[:, None].expand_as(plan.columns) if keep is None else keep & present[:, None]
    if keep is not None:
        prompts = torch.where(keep[..., None], prompts, hidden.gather(1, columns))
    return hidden.scatter(1, columns, prompts)


def read_flat(hidden: torch.Tensor, plan: SlotPlan) -> torch.Tensor:
    """The (B, W, d) rows of a flattened plan's batch, gathered from ``hidden`` (T, d)."""
    assert plan.rows is not None, "read_flat reads a flattened plan (SlotPlan.rows)"
    return hidden[plan.rows]


def write_flat_slots(
    hidden: torch.Tensor, plan: SlotPlan, prompts: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`write_slots` for a flattened batch, in place (vLLM's layers mutate their stream): ``prompts``
    (B, N, d) into ``hidden`` (T, d) at the plan's slot tokens. Returns the token indices written."""
    keep = plan.valid if plan.valid is not None else torch.ones_like(plan.columns, dtype=torch.bool)
    if present is not None:
        keep = keep & present[:, None]
    written = plan.columns[keep]
    if written.numel():
        hidden[written] = prompts[keep].to(hidden.dtype)
    return written


class SlotState(Protocol):
    """What a session holds: at least the current prefill's plan (None during decode steps)."""

    plan: SlotPlan | None


_State = TypeVar("_State", bound=SlotState)

Source = Callable[[int, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor | None]]
"""(layer index, hidden (B, W, d), the session's state) -> soft tokens (B, N, d) and the rows (B,) that have a
generator at this layer (None: all)."""

_SESSIONS: contextvars.ContextVar[Mapping[int, Any] | None] = contextvars.ContextVar("iapt_slot_sessions", default=None)


class SlotWriter:
    """Forward pre-hooks on decoder layers that write each layer's soft tokens into the slots of a plan."""

    def __init__(self, layers: Mapping[int, nn.Module], source: Source) -> None:
        self.source = source
        self.hooks = [
            layer.register_forward_pre_hook(functools.partial(self._before_layer, i), with_kwargs=True)
            for i, layer in layers.items()
        ]

    @contextlib.contextmanager
    def session(self, state: _State) -> Iterator[_State]:
        """Make ``state`` this writer's for the calls made inside (in this thread / task only)."""
        if self.state is not None:
            raise RuntimeError("slot sessions do not nest; call the base model directly inside a hook")
        token = _SESSIONS.set({**(_SESSIONS.get() or {}), id(self): state})
        try:
            yield state
        finally:
            _SESSIONS.reset(token)

    @property
    def state(self) -> Any:
        """The state of the session this thread is in, or None outside one."""
        return (_SESSIONS.get() or {}).get(id(self))

    @property
    def plan(self) -> SlotPlan | None:
        state = self.state
        return None if state is None else state.plan

    def _before_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self.state
        if state is None or state.plan is None:
            return None  # not ours, or a decode step: the slots' keys and values are in the cache already
        hidden = args[0] if args else kwargs["hidden_states"]
        prompts, present = self.source(layer, hidden, state)
        hidden = write_slots(hidden, state.plan, prompts, present)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
