"""IAPTConfig(insertion="kv"): the generators write the slots' keys and values instead of their hidden states."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, generator_parameter_count, get_iapt_model
from iapt.methods import count_for, size_for_budget
from iapt.options import MethodOptions
from tests.test_model import randomize_up_projections, with_visible_pad
from tests.tiny import left_padded_batch, make_base, reloaded

ATOL = 2e-5
KV_FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]


def kv_model(family: str, **cfg) -> IAPTModel:
    cfg.setdefault("bottleneck", 8)
    return get_iapt_model(with_visible_pad(make_base(family)), IAPTConfig(insertion="kv", **cfg))


def kv_width(model: IAPTModel) -> int:
    attention = model.base_model.model.layers[0].self_attn
    return attention.k_proj.out_features + attention.v_proj.out_features


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_fresh_kv_adapter_is_the_backbone_with_pad_slots_in_front(family):
    model = kv_model(family)
    n = model.num_soft_tokens
    _, _, rows = left_padded_batch()
    with torch.no_grad():
        for row in rows:
            slots = torch.full((n,), model.slot_token_id)
            bare = model.base_model(torch.cat([slots, row]).unsqueeze(0)).logits[0, n:]
            torch.testing.assert_close(model(row.unsqueeze(0)).logits[0], bare, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", KV_FAMILIES)
def test_trained_kv_adapter_steers_and_keeps_rows_independent(family):
    model = kv_model(family)
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        fresh = model(ids, attention_mask=mask).logits
        randomize_up_projections(model)
        batch = model(ids, attention_mask=mask).logits
        assert (batch - fresh).abs().max() > 1e-3, "the written keys/values change the output"
        for i, row in enumerate(rows):
            torch.testing.assert_close(batch[i, -len(row) :], model(row.unsqueeze(0)).logits[0], atol=ATOL, rtol=1e-4)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_generators_output_key_plus_value_width_and_the_count_follows():
    model = kv_model("llama", bottleneck=8)
    d, r, n, o = 48, 8, 4, kv_width(model)
    assert o == 2 * 2 * 12  # two key/value heads of 12 dims each, for keys and for values
    assert all(g.up.out_features == o for g in model.generators.values())
    per_layer = d * r + r * n + 12 + r * o + (r + o)
    assert generator_parameter_count(d, model.iapt_config, o) == per_layer
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer == model.expected_parameter_count()
    options = MethodOptions(insertion="kv")
    assert count_for("iapt", model.base_model, 8, options) == 2 * per_layer
    base = make_base("llama")
    size = size_for_budget("iapt", base, 10_000, options)
    step = count_for("iapt", base, size + 1, options) - count_for("iapt", base, size, options)
    assert step == 2 * (d + n + o + 1), "the budget rule sizes r by the kv generator's own count"
    assert abs(count_for("iapt", base, size, options) - 10_000) <= step / 2


def test_gradients_reach_the_generators_and_checkpointing_gives_the_same():
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = kv_model("llama")
        model.train()
        if checkpointing:
            model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.generators.parameters()])
        ups = [g.up.weight.grad for g in model.generators.values()]
        assert all(float(u.abs().sum()) > 0 for u in ups), "the zero up-projections get a gradient at the start"
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kv_adapter_save_and_load(tmp_path):
    model = kv_model("qwen2")
    randomize_up_projections(model)
    assert reloaded(model, tmp_path).iapt_config.insertion == "kv"


def test_kv_insertion_refuses_a_fused_projection_and_the_engine_refuses_kv_adapters(tmp_path):
    with pytest.raises(ValueError, match="insertion='hidden'"):
        get_iapt_model(make_base("gpt2"), IAPTConfig(bottleneck=8, insertion="kv"))
    with pytest.raises(ValueError, match="insertion="):
        IAPTConfig(insertion="keys")
    from iapt.serving.engine import read_adapter

    kv_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not serve yet"):
        read_adapter(make_base("llama"), tmp_path)
