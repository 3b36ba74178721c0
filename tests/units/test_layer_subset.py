"""Generators on a subset of layers (``layers``): a budget moves to the chosen layers as a wider bottleneck."""

from __future__ import annotations

import torch

from iapt import methods
from iapt.adapters import load_adapter
from iapt.methods import count_for, size_for_budget
from iapt.training import TrainConfig
from tests.test_model import randomize_up_projections
from tests.tiny import left_padded_batch, make_base


def test_a_budget_on_fewer_layers_buys_a_wider_bottleneck_and_the_count_is_exact():
    base = make_base("llama")  # 2 layers
    budget = 4_000
    every = size_for_budget("iapt", base, budget, TrainConfig())
    one = size_for_budget("iapt", base, budget, TrainConfig(layers=[1]))
    assert one > every  # the same budget, half the generators: about twice the width
    assert abs(count_for("iapt", base, one, TrainConfig(layers=[1])) - budget) < abs(
        count_for("iapt", base, every, TrainConfig(layers=[1])) - budget
    )
    torch.manual_seed(0)
    model = methods.build(TrainConfig(method="iapt", budget=budget, layers=[1]), make_base("llama"))
    assert set(model.generators) == {"1"}
    assert model.generators["1"].down.out_features == one
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == count_for("iapt", base, one, TrainConfig(layers=[1]))


def test_a_layer_subset_adapter_saves_and_loads_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = methods.build(TrainConfig(method="iapt", bottleneck=6, layers=[1]), make_base("llama"))
    randomize_up_projections(model)
    model.save_pretrained(tmp_path)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        bare = make_base("llama")(ids, attention_mask=mask).logits
    loaded = load_adapter(make_base("llama"), tmp_path)
    assert loaded.iapt_config.layers == [1] and set(loaded.generators) == {"1"}
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(got, bare)  # the one generator does change the output
