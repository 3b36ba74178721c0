"""IAPT's start (anchored soft tokens), bf16 backbones with float32 generators, and the Θ-step schedule."""

from __future__ import annotations

import json

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from iapt.backbone import anchor_states, frequent_token_ids
from iapt.training import TrainConfig, Trainer, train
from tests.test_model import randomize_up_projections
from tests.tiny import left_padded_batch, make_base, tiny_lm, tiny_tokenizer
from tests.training.test_trainer import config


def test_default_start_is_pad_anchored():
    cfg = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8)).iapt_config
    assert cfg.anchor == "pad" and cfg.anchor_token_ids == [0] * cfg.num_soft_tokens


def test_token_start_is_the_backbone_reading_real_tokens_first(family):
    """A fresh token-anchored adapter = the bare model with n recorded vocabulary tokens in front of every row."""
    torch.manual_seed(0)
    model = get_iapt_model(make_base(family), IAPTConfig(bottleneck=8, anchor="tokens"))
    cfg = model.iapt_config
    assert cfg.anchor == "tokens" and len(cfg.anchor_token_ids) == cfg.num_soft_tokens
    assert len(set(cfg.anchor_token_ids)) == cfg.num_soft_tokens
    assert not {0, 1, 2} & set(cfg.anchor_token_ids), "special ids (pad, bos, eos) are never anchors"
    _, _, rows = left_padded_batch()
    anchors = torch.tensor(cfg.anchor_token_ids)
    with torch.no_grad():
        for row in rows:
            ours = model(row.unsqueeze(0)).logits[0]
            bare = model.base_model(torch.cat([anchors, row]).unsqueeze(0)).logits[0, len(anchors) :]
            torch.testing.assert_close(ours, bare, atol=1e-4, rtol=1e-4)


def test_anchor_ids_are_recorded_and_reload_to_the_same_model(tmp_path):
    torch.manual_seed(5)
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8, anchor="tokens"))
    randomize_up_projections(model)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["anchor"] == "tokens" and saved["anchor_token_ids"] == model.iapt_config.anchor_token_ids
    torch.manual_seed(99)  # another RNG state: the ids come from the file, not a new draw
    loaded = IAPTModel.from_pretrained(model.unload(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, before)


def test_anchor_config_values_and_old_files(tmp_path):
    assert IAPTConfig(anchor=True).anchor == "pad" and IAPTConfig(anchor=False).anchor == "none"
    with pytest.raises(ValueError, match="anchor='sometimes' is unknown"):
        IAPTConfig(anchor="sometimes")
    with pytest.raises(ValueError, match="4 non-negative token ids"):
        IAPTConfig(anchor_token_ids=[5, 6])
    with pytest.raises(ValueError, match="anchor='none'"):
        IAPTConfig(anchor="none", anchor_token_ids=[5, 6, 7, 8])
    base = make_base("llama")
    pad = get_iapt_model(base, IAPTConfig(bottleneck=4, anchor="pad"))
    assert pad.iapt_config.anchor_token_ids == [0, 0, 0, 0]
    pad.save_pretrained(tmp_path / "p")
    pad.unload()
    config_file = tmp_path / "p" / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data.update(anchor="tokens", anchor_token_ids=None)
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="records no anchor_token_ids"):
        IAPTModel.from_pretrained(base, tmp_path / "p")
    data.update(anchor_token_ids=[5, 6, 7, 500])
    config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vocabulary of 96"):
        IAPTModel.from_pretrained(base, tmp_path / "p")


def test_frequent_ids_skip_specials_and_follow_the_generator():
    base = make_base("llama")
    a = frequent_token_ids(base, 4, torch.Generator().manual_seed(1))
    assert a == frequent_token_ids(base, 4, torch.Generator().manual_seed(1))
    assert len(set(a)) == 4 and all(3 <= i < 96 for i in a)
    states = anchor_states(base, IAPTConfig(anchor_token_ids=a))
    assert states.shape == (2, 4, 48) and states.dtype == torch.float32


def _normed_slots(model: IAPTModel, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What layer 0's attention reads at the slots: its input norm applied to the written soft tokens."""
    generator = model.generators["0"]
    written = generator(hidden, mask) + getattr(generator, "anchor", 0.0)
    return model.base_model.model.layers[0].input_layernorm(written)


@pytest.mark.parametrize("anchor", ["none", "pad", "tokens"])
def test_one_small_step_moves_anchored_slots_a_little_and_zero_slots_all_the_way(tmp_path, anchor):
    """The zero start's spike (docs/METHOD.md): the layer's norm rescales whatever the first update writes to full
    size, so one step of any LR turns 'nothing' into full-size tokens of arbitrary direction. Anchored soft tokens
    start as real states, and a small step moves what the layer reads a little."""
    trainer = Trainer(
        config(tmp_path, anchor=anchor, max_steps=1, eval_every=1, lr=1e-3, activation_mode="frozen"),
        with_visible_pad(tiny_lm()),
        tiny_tokenizer(),
    )
    model = trainer.unwrapped
    hidden, mask = torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        before = _normed_slots(model, hidden, mask)
    trainer.run()
    with torch.no_grad():
        after = _normed_slots(model, hidden, mask)
    change = float((after - before).norm() / after.norm())
    if anchor == "none":
        assert float(before.abs().max()) == 0 and change > 0.99, change
    else:
        assert change < 0.05, change


def with_visible_pad(base: torch.nn.Module) -> torch.nn.Module:
    """The tiny model embeds the pad id as zeros; a pad anchor needs a real embedding to be a real state."""
    with torch.no_grad():
        base.get_input_embeddings().weight[0].normal_(generator=torch.Generator().manual_seed(3))
    return base


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("how", ["cast after", "bf16 base"])
def test_bf16_backbone_keeps_float32_generators(how):
    torch.manual_seed(0)
    if how == "cast after":
        model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8)).to(torch.bfloat16)
    else:
        model = get_iapt_model(make_base("llama").to(torch.bfloat16), IAPTConfig(bottleneck=8))
    assert model.base_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.generators.parameters())
    assert all(g.anchor.dtype == torch.float32 for g in model.generators.values())
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in model.generators.parameters() if p.requires_grad
    )
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (3, ids.shape[1] + 3)


@pytest.mark.parametrize("method", ["iapt", "lora", "prompt-tuning", "prefix", "idpg", "lpt"])
def test_every_method_trains_on_a_bf16_backbone(tmp_path, method):
    summary = train(
        config(tmp_path, method=method, max_steps=2, eval_every=2, budget=600),
        tiny_lm().to(torch.bfloat16),
        tiny_tokenizer(),
    )
    assert summary["steps"] == 2 and summary["best_dev_loss"] < 50


# ------------------------------------------------------------------------------------------ Θ schedule
@pytest.mark.parametrize(("every", "steps"), [(1, 6), (3, 2), (4, 2)])
def test_rational_step_every_k_optimiser_steps(tmp_path, monkeypatch, every, steps):
    taken = []
    original = Trainer._dev_batch

    def counting(self):
        taken.append(self.state.step)
        return original(self)

    monkeypatch.setattr(Trainer, "_dev_batch", counting)
    trainer = Trainer(config(tmp_path, rational_every=every), tiny_lm(), tiny_tokenizer())
    trainer.run()
    assert len(taken) == steps and all(s % every == 0 for s in taken)
    assert trainer.optim.rational_schedule.last_epoch == steps  # its schedule counts Θ steps only
    with pytest.raises(ValueError, match="rational_every"):
        TrainConfig(rational_every=0)


def test_training_takes_fixed_anchor_ids(tmp_path):
    from iapt.training.trainer import build_model

    model = build_model(TrainConfig(anchor="tokens", anchor_token_ids=[7, 7, 8, 8], bottleneck=4), make_base("llama"))
    assert model.iapt_config.anchor_token_ids == [7, 7, 8, 8]
