"""Every baseline through ``iapt.training.train`` end to end, then loaded back and generating."""

from __future__ import annotations

import json
import random

import pytest
import torch

from iapt.adapters import load_adapter
from iapt.data import load_examples
from iapt.methods import METHODS, count_for, size_for
from iapt.training import TrainConfig, generate_answers, train
from tests.tiny import tiny_lm, tiny_tokenizer


def write_data(path, n=24, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        rows.append({"instruction": f"first letter early? {word}", "output": "yes" if word[0] < "n" else "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_train_end_to_end(method, tmp_path):
    data = write_data(tmp_path / "data.jsonl", n=24)
    cfg = TrainConfig(
        method=method,
        data=str(data),
        out=str(tmp_path / "run"),
        batch_size=4,
        max_steps=2,
        eval_every=2,
        lr=5e-3,
        bottleneck=4,
        num_soft_tokens=2,
        max_length=64,
        progress=False,
        seed=1,
        budget=3_000 if method in ("lora", "lpt") else None,
    )
    summary = train(cfg, tiny_lm(), tiny_tokenizer())
    out = tmp_path / "run"
    assert summary["steps"] == 2 and summary["method"] == method
    assert summary["trainable_params"] == count_for(method, tiny_lm(), size_for(cfg, tiny_lm()), cfg)
    if cfg.budget is not None:
        assert abs(summary["trainable_params"] - cfg.budget) <= count_for(method, tiny_lm(), 2, cfg) - count_for(
            method, tiny_lm(), 1, cfg
        )
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint.pt",
        "summary.json",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["dev_loss"])) for r in records if "dev_loss" in r)

    model = load_adapter(tiny_lm(), out)
    answers = generate_answers(
        model,
        tiny_tokenizer(),
        load_examples(str(data))[:3],
        max_new_tokens=3,
        batch_size=3,
        max_length=64,
        progress=False,
    )
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
