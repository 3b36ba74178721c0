"""IAPTConfig(output_scale="anchor"): the generator's output in units of the RMS of the slot's anchor state."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from tests.test_model import with_visible_pad
from tests.tiny import layer_inputs, left_padded_batch, make_base, reloaded


def model_with(scale: str, **cfg) -> IAPTModel:
    torch.manual_seed(0)
    return get_iapt_model(with_visible_pad(make_base("llama")), IAPTConfig(bottleneck=8, output_scale=scale, **cfg))


def test_a_fresh_scaled_adapter_is_the_anchored_backbone():
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        plain = model_with("none")(ids, attention_mask=mask).logits
        scaled = model_with("anchor")(ids, attention_mask=mask).logits
    torch.testing.assert_close(scaled, plain, atol=0, rtol=0)


def test_the_output_is_multiplied_by_the_anchor_rms_per_layer_and_slot():
    ids, mask, _ = left_padded_batch()
    plain, scaled = model_with("none"), model_with("anchor")
    scales = {}
    for i, g in scaled.generators.items():
        anchor = g.anchor.float()
        scales[int(i)] = anchor.square().mean(-1, keepdim=True).sqrt()  # (n, 1): RMS of each slot's anchor
        assert torch.equal(g.output_scale, scales[int(i)])
        with torch.no_grad():
            g.up.bias.normal_()
            plain.generators[i].up.bias.copy_(g.up.bias)
    assert len({round(float(s.mean()), 4) for s in scales.values()}) > 1, "the layers' anchors differ in size"
    first = int(mask[0].long().argmax())  # row 0's slots sit right after its padding
    n = scaled.num_soft_tokens
    for model, scale in ((plain, None), (scaled, scales)):
        seen = layer_inputs(model, ids, mask)
        for i, g in model.generators.items():
            expected = g.anchor.float() + (g.up.bias if scale is None else scale[int(i)] * g.up.bias)
            torch.testing.assert_close(seen[int(i)][0, first : first + n].float(), expected, atol=1e-5, rtol=1e-5)


def test_scaled_adapters_save_and_load(tmp_path):
    model = model_with("anchor")
    with torch.no_grad():
        for g in model.generators.values():
            g.up.bias.normal_()
    assert reloaded(model, tmp_path).iapt_config.output_scale == "anchor"


def test_the_engine_serves_scaled_and_plain_tenants_in_one_batch_as_offline_generate(tmp_path):
    from tests.tiny import served_like_offline, tiny_lm

    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    configs = {name: IAPTConfig(bottleneck=4, output_scale=name) for name in ("none", "anchor")}
    expected = served_like_offline(tiny_lm().eval(), tmp_path, configs, prompts)
    assert any(expected["none", tuple(p)] != expected["anchor", tuple(p)] for p in prompts), "the scale matters"


def test_output_scale_needs_an_anchor_and_hidden_insertion():
    with pytest.raises(ValueError, match="needs an anchor"):
        IAPTConfig(output_scale="anchor", anchor="none")
    with pytest.raises(ValueError, match="insertion='hidden'"):
        IAPTConfig(output_scale="anchor", insertion="kv")
    with pytest.raises(ValueError, match="output_scale="):
        IAPTConfig(output_scale="layer")


def test_the_slot_probe_sees_a_fresh_slot_at_its_anchor_and_a_trained_one_turned(slot_probe):
    _, _, rows = left_padded_batch()
    prompts = [{"input_ids": row.unsqueeze(0)} for row in rows]
    for scale in ("none", "anchor"):
        model = model_with(scale)
        fresh = slot_probe.probe(model, prompts)
        assert [r["layer"] for r in fresh] == [0, 1]
        assert all(r["out_rms"] == 0.0 and min(r["cos_slot_anchor"], r["cos_normed"]) > 0.9999 for r in fresh)
        with torch.no_grad():
            for g in model.generators.values():
                g.up.weight.normal_(std=10.0)
        turned = slot_probe.probe(model, prompts)
        assert all(r["out_rms"] > 0 and max(r["cos_slot_anchor"], r["cos_normed"]) < 0.99 for r in turned)
        assert all(0 < r["across"] and 0 <= r["pool_entropy"] <= r["uniform_entropy"] + 1e-6 for r in turned)
    assert "| layer | anchor rms |" in slot_probe.table(turned)


def test_sink_shares_are_attention_masses(slot_probe):
    model = model_with("none")
    before = model.base_model.config._attn_implementation
    prompt = {"input_ids": torch.arange(5, 25).unsqueeze(0)}
    shares = slot_probe.sink_shares(model, prompt, skip=0)
    assert model.base_model.config._attn_implementation == before, "the attention implementation is restored"
    assert shares.pop("sink_column") == 0.0, "no sink column without sink_token"
    assert all(0.0 < v < 1.0 for v in shares.values())
    assert shares["slots"] > shares["first_real_token"], "four slots in front take more than the token after them"
