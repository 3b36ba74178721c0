"""benchmarks/vllm_multitenant.py's bookkeeping: ratios paired by round, the targets, resuming (no engine runs)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its neighbours (machine, multitenant)
    try:
        spec = importlib.util.spec_from_file_location("vllm_multitenant", ROOT / "benchmarks" / "vllm_multitenant.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run(decode: float, ttft: float, rnd: str | None = None, total: float | None = None) -> dict:
    r = {"decode_tok_s": decode, "ttft_mean": ttft, "total_tok_s": total if total is not None else decode}
    return r | ({"round": rnd} if rnd is not None else {})


def test_ratios_pair_runs_of_the_same_round(bench):
    # bare drifted from 100 to 130 between rounds; IAPT ran beside it at 0.98x each time
    bare = [run(100, 1.0, "s/0"), run(130, 0.8, "s/1")]
    iapt = [run(130 * 0.98, 0.8 * 1.02, "s/1"), run(98, 1.02, "s/0")]
    assert bench.paired_ratios(iapt, bare, "decode_tok_s") == pytest.approx([0.98, 0.98])
    assert bench.paired_ratios(iapt, bare, "ttft_mean") == pytest.approx([1.02, 1.02])
    # best against best would have said 127.4 / 130 = 0.98 here too, but not if IAPT's best came from round 0:
    drifted = [run(98, 1.0, "s/0"), run(90, 1.0, "s/1")]
    assert bench.paired_ratios(drifted, bare, "decode_tok_s") == pytest.approx([0.98, 90 / 130])


def test_runs_without_rounds_fall_back_to_best_over_best(bench):
    bare = [run(100, 1.0), run(120, 1.0)]
    iapt = [run(110, 1.1), run(90, 1.0)]
    assert bench.paired_ratios(iapt, bare, "decode_tok_s") == pytest.approx([110 / 120])


def args(**kw) -> argparse.Namespace:
    base = {"tenants": [1, 16], "zipf_s": 1.2, "repeats": 2, "rows": ["vllm-bare", "vllm-iapt", "vllm-lora-all"]}
    return argparse.Namespace(**(base | kw))


def cells(decode: float, ttft: float, rounds: int = 2) -> dict:
    keys = ["1/uniform", "16/uniform", "16/zipf:1.2"]
    return {"cells": {k: [run(decode, ttft, f"s/{r}") for r in range(rounds)] for k in keys}}


def test_targets_say_met_and_missed(bench):
    results = {"vllm-bare": cells(100, 1.0), "vllm-iapt": cells(96, 1.04), "vllm-lora-all": cells(20, 5.0)}
    lines = bench.targets(args(), results)
    assert len(lines) == 5  # 3 cells x (IAPT vs bare) + 2 cells at N = 16 x (IAPT vs all-linear LoRA)
    assert "decode 0.960× bare (missed: ≥ 0.97)" in lines[0]
    assert "TTFT 1.040× bare (met: ≤ 1.05)" in lines[0]
    assert "4.80× all-linear LoRA (met" in lines[2]


def test_rounds_done_counts_the_shortest_cell(bench):
    a = args()
    assert bench._rounds_done(a, None) == 0
    result = cells(100, 1.0, rounds=2)
    assert bench._rounds_done(a, result) == 2
    result["cells"]["16/zipf:1.2"].pop()
    assert bench._rounds_done(a, result) == 1  # that row is measured again (bare joins it)
