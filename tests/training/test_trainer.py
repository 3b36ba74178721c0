"""The training loop on a tiny model: activation modes, resume equivalence, atomic saves, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

from iapt import IAPTModel
from iapt.data import DataError
from iapt.training import TrainConfig, Trainer, train
from tests.tiny import tiny_lm, tiny_tokenizer


def write_data(path, n=48, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        rows.append({"instruction": f"first letter early? {word}", "output": "yes" if word[0] < "n" else "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, **kw) -> TrainConfig:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_data(data)
    defaults = dict(
        data=str(data),
        out=str(tmp_path / "run"),
        batch_size=8,
        max_steps=6,
        eval_every=3,
        lr=5e-3,
        rational_lr=5e-3,
        bottleneck=4,
        max_length=64,
        progress=False,
        seed=1,
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


def run(cfg: TrainConfig, **kw) -> dict:
    return train(cfg, tiny_lm(), tiny_tokenizer(), **kw)


@pytest.mark.parametrize("mode", ["bilevel", "joint", "frozen"])
def test_each_activation_mode_trains_and_writes_a_run_folder(tmp_path, mode, monkeypatch):
    dev_draws = []
    original = Trainer._dev_batch

    def counting(self):
        dev_draws.append(1)
        return original(self)

    monkeypatch.setattr(Trainer, "_dev_batch", counting)
    cfg = config(tmp_path, activation_mode=mode)
    summary = run(cfg)
    out = tmp_path / "run"
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint.pt",
        "metrics.jsonl",
        "summary.json",
        "train_config.json",
        "loss.png",
        "activations.png",
    ):
        assert (out / name).is_file(), name
    assert summary["steps"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_loss" in r] == [3, 6]
    assert any("train_loss" in r for r in records)
    # the Θ step draws one dev batch every rational_every (5) optimiser steps (steps 0 and 5), in bi-level only
    assert len(dev_draws) == (2 if mode == "bilevel" else 0)
    adapter = IAPTModel.from_pretrained(tiny_lm(), out / "adapter")
    moved = [
        not torch.allclose(
            g.activation.numerator,
            torch.tensor([7.5150942e-05, 0.50000094, 0.39799759, 0.17708823, 0.076701052, 0.021872214, 0.0024288519]),
        )
        for g in adapter.generators.values()
    ]
    assert all(moved) if mode != "frozen" else not any(moved)
    assert summary["trainable_params"] == adapter.expected_parameter_count()


def test_training_lowers_the_dev_loss(tmp_path):
    summary = run(config(tmp_path, max_steps=30, eval_every=5, lr=2e-2))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = [r["dev_loss"] for r in history if "dev_loss" in r]
    assert dev[-1] < dev[0] - 0.1, dev
    assert summary["best_dev_loss"] == min(dev)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    whole.mkdir()
    run(config(whole, save_every=1, gradient_accumulation_steps=2, eval_every=2))

    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = config(killed, save_every=1, gradient_accumulation_steps=2, eval_every=2)
    original = Trainer._optimiser_step
    calls = []

    def dies_at_step_four(self, batches):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return original(self, batches)

    monkeypatch.setattr(Trainer, "_optimiser_step", dies_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Trainer, "_optimiser_step", original)
    cfg.resume = True
    summary = run(cfg)
    assert summary["steps"] == 6
    a, b = _weights(whole / "run"), _weights(killed / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def strip(p):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tokens_per_s")}
            for line in (p / "run" / "metrics.jsonl").read_text().splitlines()
        ]

    assert strip(whole) == strip(killed)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(config(tmp_path))
    with pytest.raises(ValueError, match="bottleneck: 4 then, 8 now"):
        run(config(tmp_path, bottleneck=8, resume=True))


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    run(config(tmp_path))
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        run(config(tmp_path))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_steps=3, eval_every=3)
    run(cfg)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()

    def broken_save(*_a, **_k):
        raise OSError("disk full")

    cfg.resume, cfg.max_steps = True, 6
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises((OSError, ValueError)):
        run(cfg)
    assert checkpoint.read_bytes() == before
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_input_gets_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        run(config(tmp_path, data=str(empty)))
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "q", "response": "x" * 200}) + "\n" for _ in range(4)))
    with pytest.raises(DataError, match="max_length=64"):
        run(config(tmp_path, data=str(long)))
    with pytest.raises(DataError, match="unknown task 'nope'"):
        run(config(tmp_path, data=None, task="nope"))
    with pytest.raises(ValueError, match="exactly one of --task"):
        run(config(tmp_path, data=None))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run(config(tmp_path, out=str(tmp_path / "fresh"), resume=True))


def test_recipe_file_with_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 0.01\nbottleneck: 8\nactivation_mode: joint\n")
    cfg = TrainConfig.from_yaml(recipe, bottleneck=16)
    assert (cfg.lr, cfg.bottleneck, cfg.activation_mode) == (0.01, 16, "joint")
    recipe.write_text("learning_rate: 0.01\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_yaml(recipe)


def test_temporaries_left_by_a_killed_write_are_removed_on_start_and_resume(tmp_path):
    """kill -9 during an atomic write leaves ``.NAME.XXXXXXXX.tmp``; the next start or resume removes it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".metrics.jsonl.k2j4_9zq.tmp").write_text("half")
    (out / "notes.tmp").write_text("the user's")  # not our naming: kept
    cfg = config(tmp_path, max_steps=3, eval_every=3)
    run(cfg)
    assert not (out / ".metrics.jsonl.k2j4_9zq.tmp").exists() and (out / "notes.tmp").is_file()
    (out / ".checkpoint.pt.a1b2c3d4.tmp").write_bytes(b"\x80half a pickle")
    (out / ".adapter.q9w8e7r6.tmp").mkdir()
    (out / ".adapter.q9w8e7r6.tmp" / "adapter_config.json").write_text("{")
    (out / ".adapter.old").mkdir()
    cfg.resume = True
    run(cfg)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "notes.tmp").is_file()


def test_bad_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    import iapt.models

    def no_download(*_a, **_k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(iapt.models, "load_model", no_download)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not UTF-8"):
        Trainer(config(tmp_path, data=str(bad)))
