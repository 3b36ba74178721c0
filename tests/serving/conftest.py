"""Tiny backbone + three tenants' adapters that differ in r, n, layers and pooling; offline references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from tests.tiny import make_base, tiny_lm, tiny_tokenizer

ADAPTERS = {
    "alice": {"bottleneck": 8, "num_soft_tokens": 4},
    "bob": {"bottleneck": 4, "num_soft_tokens": 2, "layers": [1]},  # fewer slots, one layer only
    "carol": {"bottleneck": 8, "num_soft_tokens": 4, "pooling": "mean"},  # another pooling mode in the same batch
}


def save_adapter(base: torch.nn.Module, path: Path, seed: int, **cfg) -> Path:
    """An adapter whose soft tokens depend on the instruction and steer the tiny backbone.

    The up-projection starts at zero (constant soft tokens); random weights make every part of the
    generator (down-projection, pooling, activation) show in the output.
    """
    torch.manual_seed(seed)
    model = get_iapt_model(base, IAPTConfig(**cfg))
    with torch.no_grad():
        for gen in model.generators.values():
            torch.nn.init.normal_(gen.up.weight, std=1.0)
            torch.nn.init.normal_(gen.up.bias, std=0.5)
    model.save_pretrained(path)
    model.unload()
    return path


@pytest.fixture(scope="package")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_lm()
    for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1):
        save_adapter(base, root / name, seed, **cfg)
    return root


@pytest.fixture(scope="package")
def wrong_base_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained on a GPT-2-family base of another hidden size: the llama server must refuse it."""
    return save_adapter(make_base("gpt2"), tmp_path_factory.mktemp("wrong") / "mallory", 9, bottleneck=4)


@pytest.fixture(scope="package")
def reference():
    """Greedy offline generation (IAPTModel.generate / the bare backbone) on a private copy of the base.

    A separate copy, so references can be computed while a server's engine thread runs its own.
    """
    base = tiny_lm().eval()
    cache: dict = {}

    def generate(adapter_dir: Path | None, prompt: list[int], max_tokens: int) -> list[int]:
        key = (adapter_dir, tuple(prompt), max_tokens)
        if key not in cache:
            ids = torch.tensor([prompt])
            kwargs = {"max_new_tokens": max_tokens, "do_sample": False, "pad_token_id": 0}
            if adapter_dir is None:
                out = base.generate(ids, **kwargs)
            else:
                model = IAPTModel.from_pretrained(base, adapter_dir)
                try:
                    out = model.generate(ids, **kwargs)
                finally:
                    model.unload()
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return generate


@pytest.fixture(scope="package")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def handles(server, monkeypatch):
    """Record the engine handles of every request submitted during the test (``server``: the test module's)."""
    seen = []
    submit_many = server.engine.submit_many

    def recording(requests):
        out = submit_many(requests)
        seen.extend(out)
        return out

    monkeypatch.setattr(server.engine, "submit_many", recording)
    return seen
