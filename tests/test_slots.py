"""iapt.slots: the one slot mechanism (layout, plan, writer) that IAPTModel, IDPG/LPT and the engine share."""

from __future__ import annotations

import threading

import pytest
import torch

from iapt.slots import SlotPlan, SlotWriter, insert_slots, read_flat, slot_layout, write_flat_slots, write_slots
from tests.tiny import left_padded_batch, make_base


def test_layout_puts_each_rows_slots_after_its_padding():
    _, mask, rows = left_padded_batch()
    source, is_slot = slot_layout(mask, 2)
    full = insert_slots(mask, source, is_slot, 1)
    for i, row in enumerate(rows):
        pad = mask.shape[1] - len(row)
        assert is_slot[i].nonzero().flatten().tolist() == [pad, pad + 1]
        assert full[i].tolist() == [0] * pad + [1] * (len(row) + 2)
    _, front = slot_layout(mask, 2, after_padding=False)
    assert front[:, :2].all() and not front[:, 2:].any()


def test_write_keeps_rows_without_a_generator_and_slots_past_a_rows_count():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    plan = SlotPlan(
        columns=torch.tensor([[0, 1], [2, 3]]),
        pooled=torch.ones(2, 5, dtype=torch.bool),
        valid=torch.tensor([[True, True], [True, False]]),
    )
    prompts = -torch.ones(2, 2, 3)
    out = write_slots(hidden, plan, prompts)
    assert (out[0, :2] == -1).all() and (out[1, 2] == -1).all()
    assert torch.equal(out[1, 3], hidden[1, 3]), "row 1 has one slot: its second column keeps its state"
    out = write_slots(hidden, plan, prompts, present=torch.tensor([False, True]))
    assert torch.equal(out[0], hidden[0]), "a row without a generator at this layer keeps its slots"
    contiguous = SlotPlan.contiguous(torch.tensor([[False, True, True, False]]), torch.ones(1, 4, dtype=torch.bool), 2)
    assert contiguous.columns.tolist() == [[1, 2]]


def test_a_flattened_plan_writes_the_same_slots_as_the_batched_one():
    """vLLM's batch is one (T, d) sequence of requests: the flat plan must read and write what the (B, W, d) plan
    of the same requests does."""
    hidden = torch.randn(2, 5, 3)
    batched = SlotPlan(
        columns=torch.tensor([[0, 1], [0, 1]]),
        pooled=torch.tensor([[False, False, True, True, True], [False, False, True, True, False]]),
        valid=torch.tensor([[True, True], [True, False]]),
    )
    flat_hidden = torch.cat([hidden[0], hidden[1, :4]])  # request 1 is 4 tokens long: it starts at token 5
    flat = SlotPlan(
        columns=torch.tensor([[0, 1], [5, 5]]),
        pooled=torch.tensor([[True, True, True], [True, True, False]]),
        valid=batched.valid,
        rows=torch.tensor([[2, 3, 4], [7, 8, 5]]),
    )
    gathered = read_flat(flat_hidden, flat)
    assert torch.equal(gathered[0], hidden[0, 2:5]) and torch.equal(gathered[1, :2], hidden[1, 2:4])
    prompts = torch.randn(2, 2, 3)
    present = torch.tensor([True, True])
    expected = write_slots(hidden, batched, prompts, present)
    written = write_flat_slots(flat_hidden, flat, prompts, present)
    assert written.tolist() == [0, 1, 5]
    assert torch.equal(flat_hidden[:5], expected[0]) and torch.equal(flat_hidden[5:], expected[1, :4])
    assert write_flat_slots(flat_hidden, flat, prompts, torch.tensor([False, False])).numel() == 0


def test_a_writer_acts_only_inside_its_own_session_and_thread():
    base = make_base("llama")
    layers = dict(enumerate(base.model.layers))
    calls = []

    def source(layer, hidden, state):
        calls.append((layer, threading.get_ident()))
        return torch.zeros(hidden.shape[0], 2, hidden.shape[-1]), None

    writer = SlotWriter(layers, source)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        bare = base(ids, attention_mask=mask).logits
        assert calls == [], "no session: the bare backbone"

        class State:
            plan = SlotPlan.contiguous(
                torch.zeros_like(mask, dtype=torch.bool).index_fill(1, torch.tensor([0, 1]), True), mask.bool(), 2
            )

        other: list[torch.Tensor] = []
        with writer.session(State()):
            with pytest.raises(RuntimeError, match="do not nest"):
                with writer.session(State()):
                    pass
            thread = threading.Thread(target=lambda: other.append(base(ids, attention_mask=mask).logits))
            thread.start()
            thread.join()
            written = base(ids, attention_mask=mask).logits
        assert {layer for layer, _ in calls} == {0, 1} and {t for _, t in calls} == {threading.get_ident()}
        torch.testing.assert_close(other[0], bare, atol=0, rtol=0)  # another thread's forward is left alone
        assert (written - bare).abs().max() > 1e-4
        writer.remove()
        calls.clear()
        with writer.session(State()):
            torch.testing.assert_close(base(ids, attention_mask=mask).logits, bare, atol=0, rtol=0)
        assert calls == [], "removed: no hooks left"
