"""IAPTConfig(sink_token=True): a plain slot-token column before the soft tokens keeps the backbone's attention sink."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from tests.test_model import ATOL, randomize_up_projections, with_visible_pad
from tests.tiny import (
    layer_inputs,
    left_padded_batch,
    make_base,
    reloaded,
    served_like_offline,
    tiny_lm,
    tiny_tokenizer,
)

TOKENS = [5, 9, 13, 17]


def sink_model(family: str = "llama", **cfg) -> IAPTModel:
    torch.manual_seed(0)
    settings = {"bottleneck": 8, "sink_token": True, "anchor": "tokens", "anchor_token_ids": TOKENS, **cfg}
    return get_iapt_model(with_visible_pad(make_base(family)), IAPTConfig(**settings))


def test_a_fresh_sink_adapter_is_the_backbone_reading_the_sink_and_its_anchor_tokens_first(family):
    """Anchors are the states the anchor tokens have *after* the sink column, so a fresh adapter (zero
    up-projection) is exactly the bare model on ``[pad, tokens..., prompt]``: nothing about the backbone moves."""
    model = sink_model(family)
    assert model.num_slots == 5
    _, _, rows = left_padded_batch()
    lead = torch.tensor([model.slot_token_id, *TOKENS])
    with torch.no_grad():
        for row in rows:
            ours = model(row.unsqueeze(0)).logits[0]
            bare = model.base_model(torch.cat([lead, row]).unsqueeze(0)).logits[0, len(lead) :]
            torch.testing.assert_close(ours, bare, atol=ATOL, rtol=1e-4)


def test_no_generator_writes_the_sink_column():
    """With generators that write something, the soft tokens change at every layer and the sink column does not:
    at each layer it holds what a lone pad token holds there in the bare model."""
    model = sink_model()
    randomize_up_projections(model)
    row = left_padded_batch()[2][0].unsqueeze(0)
    seen = {i: h[0] for i, h in layer_inputs(model, row).items()}
    with torch.no_grad():
        alone = model.base_model(torch.tensor([[model.slot_token_id]]), output_hidden_states=True).hidden_states
        fresh = {i: h[0] for i, h in layer_inputs(sink_model(), row).items()}
    for i, hidden in seen.items():
        torch.testing.assert_close(hidden[0], alone[i][0, 0], atol=ATOL, rtol=1e-4)
        assert not torch.allclose(hidden[1:5], fresh[i][1:5]), f"layer {i}: the soft tokens were not written"


def test_sink_rows_stay_independent_of_their_batch_and_generate_drops_every_slot():
    model = sink_model()
    randomize_up_projections(model)
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(
                batch_logits[i, -len(row) :], model(row.unsqueeze(0)).logits[0], atol=ATOL, rtol=1e-4
            )
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 3)
    assert torch.equal(out[:, : ids.shape[1]], ids), "generate returns the prompt, no slot in it"
    with torch.no_grad():  # the first new token is the forward's greedy pick at the last position
        assert torch.equal(out[:, ids.shape[1]], batch_logits[:, -1].argmax(-1))


def test_inputs_embeds_give_the_sink_column_the_slot_tokens_embedding():
    model = sink_model(layers=[1])  # layer 0 has no generator: the slot columns keep what they were fed
    randomize_up_projections(model)
    ids, mask, _ = left_padded_batch()
    embeds = model.base_model.get_input_embeddings()(ids)
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(by_embeds, by_ids, atol=ATOL, rtol=1e-4)


def test_a_sink_adapter_saves_and_loads(tmp_path):
    model = sink_model()
    randomize_up_projections(model)
    loaded = reloaded(model, tmp_path)  # the same logits after save and load
    assert loaded.iapt_config.sink_token and loaded.num_slots == loaded.iapt_config.num_slots == 5


def test_the_engine_serves_sink_and_plain_tenants_in_one_batch_as_offline_generate(tmp_path):
    """The engine lays out the sink column and writes only the soft tokens after it (tests/vllm: vLLM does too)."""
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    anchored = {"anchor": "tokens", "anchor_token_ids": TOKENS}
    configs = {
        "plain": IAPTConfig(bottleneck=4, **anchored),
        "sink": IAPTConfig(bottleneck=4, sink_token=True, **anchored),
        "sink-pad": IAPTConfig(bottleneck=4, num_soft_tokens=2, sink_token=True),
    }
    expected = served_like_offline(tiny_lm().eval(), tmp_path, configs, prompts)
    assert any(expected["plain", tuple(p)] != expected["sink", tuple(p)] for p in prompts), "the sink matters"


def test_the_slot_probe_reads_the_soft_tokens_after_the_sink_column(slot_probe):
    """A fresh sink adapter's soft tokens sit at their anchors (so the probe reads columns 1..n, not the sink);
    the sink column takes attention of its own, and the soft tokens keep some."""
    model = sink_model()
    _, _, rows = left_padded_batch()
    fresh = slot_probe.probe(model, [{"input_ids": row.unsqueeze(0)} for row in rows])
    assert all(r["out_rms"] == 0.0 and r["cos_slot_anchor"] > 0.9999 for r in fresh)
    shares = slot_probe.sink_shares(model, {"input_ids": torch.arange(5, 25).unsqueeze(0)}, skip=0)
    assert all(0.0 < v < 1.0 for v in shares.values())


def test_the_sink_column_counts_against_the_context(tmp_path):
    from iapt.serving import Engine, Request

    base = tiny_lm().eval()
    for name, sink in (("plain", False), ("sink", True)):
        model = get_iapt_model(base, IAPTConfig(bottleneck=4, sink_token=sink))
        model.save_pretrained(tmp_path / name)
        model.unload()
    engine = Engine(base, tiny_tokenizer(), tmp_path)
    try:
        room = engine.max_positions - 4  # what 4 soft tokens leave
        prompt = [5] * (room - 2)
        assert engine.generate_many([Request(prompt, "plain", max_tokens=2)])[0].tokens
        with pytest.raises(ValueError, match="less the adapter's 5 slots"):
            engine.submit(Request(prompt, "sink", max_tokens=2))
    finally:
        engine.close()
