"""benchmarks/quality.py's bookkeeping: LR choice, the tables, resumable claims (no model is trained here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(**kw) -> argparse.Namespace:
    base = {
        "model": "default",
        "tasks": ["sentiment", "e2e"],
        "methods": ["iapt", "lora"],
        "ablations": ["iapt-joint"],
        "seeds": [1, 2, 3],
        "budget": 1000,
        "lr": 1e-3,
        "lr_grid": [1e-4, 1e-3],
        "sweep_budgets": [],
        "sweep_tasks": ["sentiment"],
        "steps": 20,
        "batch_size": 4,
        "max_length": 64,
        "dev_examples": 8,
        "test_examples": 10,
        "cap": {},
        "tune_ablations": [],
        "fixed_lr": {},
        "threads": 1,
        "dtype": "float32",
        "train_examples": None,
        "always_seeded": ["lora"],
        "ablation_tasks": [],
        "edge": 0,
    }
    return argparse.Namespace(**{**base, **kw})


def tuned(method: str, lr: float, loss: float) -> dict:
    return {
        "method": method,
        "task": "sentiment",
        "seed": 1,
        "budget": 1000,
        "lr": lr,
        "params": 990,
        "steps": 20,
        "dev_loss": loss,
        "seconds": 1.0,
    }


def scored(method: str, task: str, seed: int, score: float, budget: int = 1000, params: int = 990) -> dict:
    return {
        **tuned(method, 1e-3, 1.0),
        "task": task,
        "seed": seed,
        "budget": budget,
        "params": params,
        "score": score,
        "metrics": {},
    }


def test_each_method_gets_its_lowest_dev_loss_lr_and_ablations_inherit_iapts(quality):
    results = [tuned("iapt", 1e-4, 0.9), tuned("iapt", 1e-3, 1.2), tuned("lora", 1e-4, 0.8), tuned("lora", 1e-3, 0.5)]
    assert quality.choose_lrs(args(), results) == {"iapt": 1e-4, "lora": 1e-3, "iapt-joint": 1e-4}


def test_table_reports_median_range_and_a_mean_only_when_every_task_is_there(quality):
    results = [scored("iapt", "sentiment", s, v) for s, v in ((1, 10.0), (2, 30.0), (3, 20.0))]
    results += [scored("iapt", "e2e", s, v) for s, v in ((1, 40.0), (2, 50.0), (3, 60.0))]
    results += [scored("lora", "sentiment", 1, 70.0)]
    report = quality.write_report(args(), results)
    iapt_row = next(line for line in report.splitlines() if line.startswith("| iapt |"))
    assert "20.0 (10.0–30.0)" in iapt_row and "50.0 (40.0–60.0)" in iapt_row and "**35.0**" in iapt_row
    assert "| 3 |" in iapt_row  # seeds
    lora_row = next(line for line in report.splitlines() if line.startswith("| lora |"))
    assert lora_row.rstrip().endswith("| — |"), "no mean over a task that was not run"


def test_report_keeps_the_prose_around_its_markers(quality, tmp_path):
    path = tmp_path / "Q.md"
    path.write_text("# Title\n\nprose before\n")
    quality.write_between_markers(path, "table v1\n")
    path.write_text(path.read_text() + "\nprose after\n")
    quality.write_between_markers(path, "table v2\n")
    text = path.read_text()
    assert "prose before" in text and "prose after" in text and "table v2" in text and "table v1" not in text


def test_claims_are_exclusive_and_a_dead_workers_claim_is_taken_over(quality, tmp_path):
    assert quality.claim(tmp_path, "cell-a")
    assert quality.claim(tmp_path, "cell-a"), "a process keeps its own claim"
    other = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(other.stdout)  # that process has exited
    (tmp_path / ".locks" / "cell-b").mkdir(parents=True)
    (tmp_path / ".locks" / "cell-b" / "pid").write_text(str(dead_pid))
    assert quality.claim(tmp_path, "cell-b")
    (tmp_path / ".locks" / "cell-c").mkdir()
    (tmp_path / ".locks" / "cell-c" / "pid").write_text(str(os.getppid()))  # alive, not us
    assert not quality.claim(tmp_path, "cell-c")


def test_results_are_read_back_from_every_finished_cell(quality, tmp_path):
    for name, result in (("a", tuned("iapt", 1e-4, 0.9)), ("b", scored("lora", "e2e", 1, 5.0))):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert len(quality.load_results(tmp_path)) == 2


def test_an_ablation_that_changes_scale_gets_its_own_lr(quality):
    results = [
        tuned("iapt", 1e-4, 0.9),
        tuned("iapt", 1e-3, 1.2),
        tuned("iapt-anchor", 1e-4, 2.0),
        tuned("iapt-anchor", 1e-3, 1.0),
        tuned("lora", 1e-3, 0.5),
    ]
    lrs = quality.choose_lrs(args(ablations=["iapt-anchor", "iapt-joint"], tune_ablations=["iapt-anchor"]), results)
    assert lrs["iapt-anchor"] == 1e-3 and lrs["iapt-joint"] == 1e-4 == lrs["iapt"]


def test_ablation_table_compares_on_the_first_seed_only(quality):
    results = [scored("iapt", "sentiment", s, v) for s, v in ((1, 10.0), (2, 90.0))]
    results += [scored("iapt-joint", "sentiment", 1, 20.0)]
    report = quality.write_report(args(tasks=["sentiment"]), results)
    main, ablations = report.split("### IAPT ablations")
    assert "| iapt | 990 | 0.001 | 2 | 50.0 (10.0–90.0) |" in main
    assert "| iapt | 990 | 0.001 | 1 | 10.0 |" in ablations and "| iapt-joint | 990 | 0.001 | 1 | 20.0 |" in ablations


def test_seed_counts_show_when_tasks_differ(quality):
    results = [scored("lora", "sentiment", s, 1.0) for s in (1, 2, 3)] + [scored("lora", "e2e", s, 1.0) for s in (1, 2)]
    row = next(line for line in quality.write_report(args(), results).splitlines() if line.startswith("| lora |"))
    assert "| 2–3 |" in row


def test_an_ablation_promoted_to_the_main_table_is_tuned_once(quality):
    a = args(methods=["iapt", "iapt-anchor"], tune_ablations=["iapt-anchor"])
    assert quality.tuned_methods(a) == ["iapt", "iapt-anchor"]  # the run waits for exactly this many tuning cells
    results = [tuned("iapt", 1e-3, 1.0), tuned("iapt-anchor", 1e-3, 0.8)]
    lr_rows = quality.write_report(a, results).split("### LR tuning")[1]
    assert lr_rows.count("| iapt-anchor |") == 1


def test_ablation_names_map_to_train_settings(quality):
    assert quality.method_settings("iapt-tokens-8") == {
        "method": "iapt",
        "activation_mode": "bilevel",
        "num_soft_tokens": 8,
    }
    assert quality.method_settings("iapt-pool-mean")["pooling"] == "mean"
    assert quality.method_settings("iapt-anchor-frozen-gelu") == {
        "method": "iapt",
        "anchor": "pad",
        "activation_mode": "frozen",
        "activation_init": "gelu",
    }
    assert quality.method_settings("iapt-zero")["anchor"] == "none"
    assert quality.method_settings("iapt-pad")["anchor"] == "pad"
    assert quality.method_settings("iapt-vocab")["anchor"] == "tokens"
    assert quality.method_settings("iapt-every-1")["rational_every"] == 1
    assert quality.method_settings("iapt-fp32")["dtype"] == "float32"
    assert quality.method_settings("iapt-kv-tokens-8")["insertion"] == "kv"
    assert quality.method_settings("iapt-scaled")["output_scale"] == "anchor"
    assert quality.method_settings("lora") == {"method": "lora"}
    with pytest.raises(ValueError, match="unknown IAPT variant"):
        quality.method_settings("iapt-anchr")
    with pytest.raises(ValueError, match="unknown layer subset 'top'"):
        quality.method_settings("iapt-layers-top")


def test_layer_subsets_resolve_against_the_base(quality):
    base = make_base("llama")
    base.config.num_hidden_layers = 5
    assert quality.layer_subset(quality.method_settings("iapt-layers-upper"), base)["layers"] == [2, 3, 4]
    assert quality.layer_subset(quality.method_settings("iapt-layers-lower"), base)["layers"] == [0, 1]
    assert quality.layer_subset(quality.method_settings("iapt-layers-even"), base)["layers"] == [0, 2, 4]
    assert quality.layer_subset(quality.method_settings("iapt-layers-odd"), base)["layers"] == [1, 3]
    assert "layers" not in quality.layer_subset(quality.method_settings("iapt"), base)


def test_variants_of_a_separately_tuned_ablation_take_its_lr(quality):
    assert quality.tuning_method("iapt-anchor-frozen-gelu", ["iapt-anchor"]) == "iapt-anchor"
    assert quality.tuning_method("iapt-frozen-gelu", ["iapt-anchor"]) == "iapt"
    assert quality.tuning_method("lora", ["iapt-anchor"]) == "lora"


def test_fixed_lrs_replace_tuning_and_ablations_follow_them(quality):
    a = args(ablations=["iapt-joint"], fixed_lr={"iapt": 3e-3})
    assert quality.tuned_methods(a) == ["lora"]  # no tuning cells for iapt, so the run does not wait for them
    lrs = quality.choose_lrs(a, [tuned("iapt", 1e-4, 0.1), tuned("lora", 1e-3, 0.5)])
    assert lrs["iapt"] == 3e-3 == lrs["iapt-joint"] and lrs["lora"] == 1e-3
    assert "LRs given, not tuned in this run (`--fixed-lr`): iapt 0.003." in quality.write_report(a, [])


def test_lrs_outside_the_grid_are_not_chosen(quality):
    results = [tuned("iapt", 1e-4, 0.9), tuned("iapt", 1e-2, 0.1), tuned("lora", 1e-3, 0.5)]
    assert quality.choose_lrs(args(), results)["iapt"] == 1e-4  # 1e-2 is not in this run's grid
    assert quality.choose_lrs(args(lr_grid=[1e-4, 1e-3, 1e-2]), results)["iapt"] == 1e-2


def test_a_best_lr_at_the_grids_edge_gets_points_beyond_it_until_it_is_bracketed(quality):
    a = args(lr_grid=[3e-4, 1e-3, 3e-3], edge=2)
    assert [quality.beyond(a.lr_grid, lr) for lr in (3e-3, 3e-4, 1e-3)] == [1e-2, 1e-4, None]
    assert quality.beyond([3e-4, 1e-3, 3e-3, 1e-2], 1e-2) == 3e-2
    grid = [tuned("iapt", 3e-4, 0.9), tuned("iapt", 1e-3, 0.5), tuned("iapt", 3e-3, 0.3)]
    grid += [tuned("lora", 3e-4, 0.9), tuned("lora", 1e-3, 0.2), tuned("lora", 3e-3, 0.3)]
    assert quality.missing_tuning(a, grid[:2]) == {("iapt", 3e-3), *{("lora", lr) for lr in (3e-4, 1e-3, 3e-3)}}, (
        "the edge is decided only once the grid is done"
    )
    assert quality.missing_tuning(a, grid) == {("iapt", 1e-2)}, "iapt's best is the top: 1e-2 next; lora's is inside"
    assert quality.missing_tuning(a, grid, ["lora"]) == set()
    assert quality.choose_lrs(a, grid)["iapt"] == 3e-3
    assert quality.choose_lrs(a, grid + [tuned("iapt", 1e-2, 0.35)])["iapt"] == 3e-3
    assert quality.missing_tuning(a, grid + [tuned("iapt", 1e-2, 0.35)]) == set(), "3e-3 is bracketed: no more"
    better = grid + [tuned("iapt", 1e-2, 0.25)]
    assert quality.missing_tuning(a, better) == {("iapt", 3e-2)}, "1e-2 is the new top and the best: 3e-2 next"
    assert quality.choose_lrs(a, better + [tuned("iapt", 3e-2, 0.26)])["iapt"] == 1e-2
    assert quality.choose_lrs(a, better + [tuned("iapt", 3e-2, 0.2)])["iapt"] == 3e-2
    assert quality.edge_lrs(a, better + [tuned("iapt", 3e-2, 0.2)], "iapt") == [1e-2, 3e-2], "--edge 2: at most two"
    assert quality.choose_lrs(a, grid + [tuned("lora", 1e-2, 0.1)])["lora"] == 1e-3, "no edge point for lora"
    assert quality.missing_tuning(args(lr_grid=[3e-4, 1e-3, 3e-3]), grid) == set(), "--edge 0: the grid alone"
    report = quality.write_report(a, better)
    assert "| 0.0003 | 0.001 | 0.003 | 0.01 |" in report


def test_a_cell_trained_at_another_lr_is_set_aside_not_reused(quality, tmp_path):
    cell = tmp_path / "q-iapt-sentiment-b1000-s1.json"
    cell.write_text(json.dumps(scored("iapt", "sentiment", 1, 50.0)))  # trained at 1e-3
    assert quality.cached_result(cell, 1e-3)["score"] == 50.0
    assert quality.cached_result(cell, 3e-3) is None  # the new LR trains again
    assert not cell.exists()
    kept = tmp_path / "superseded" / "q-iapt-sentiment-b1000-s1-lr0.001.json"
    assert json.loads(kept.read_text())["score"] == 50.0
    assert quality.load_results(tmp_path) == []  # superseded cells are out of the tables


def test_lrs_wait_for_this_runs_own_tuning_cells(quality):
    a = args(lr_grid=[1e-4, 1e-3, 1e-2])
    others = [tuned("idpg", lr, 1.0) for lr in (1e-4, 1e-3, 1e-2, 3e-3)]  # plenty of cells, none of this run's
    done = [tuned(m, lr, 1.0) for m in ("iapt", "lora") for lr in (1e-4, 1e-3)]
    assert quality.missing_tuning(a, others + done) == {("iapt", 1e-2), ("lora", 1e-2)}
    assert quality.missing_tuning(a, done + [tuned("iapt", 1e-2, 1.0), tuned("lora", 1e-2, 1.0)]) == set()


def test_malformed_method_values_are_a_usage_error(quality):
    parser = argparse.ArgumentParser()
    assert quality.method_values(parser, "--fixed-lr", ["iapt=3e-4", "lora=1e-3"], float) == {
        "iapt": 3e-4,
        "lora": 1e-3,
    }
    for bad in ("iapt", "iapt=fast", "=1e-3"):
        with pytest.raises(SystemExit):
            quality.method_values(parser, "--fixed-lr", [bad], float)


def test_paired_interval_covers_zero_for_a_method_against_itself_and_finds_a_real_gap(quality):
    import numpy as np

    rng = np.random.default_rng(1)
    a = [list(rng.integers(0, 2, 200) * 100.0) for _ in range(3)]  # one task, 3 seeds, 200 examples
    point, low, high = quality.paired_interval([a], [a])
    assert point == 0 and low <= 0 <= high
    better = [[100.0 if rng.random() < 0.7 else 0.0 for _ in range(200)] for _ in range(3)]
    worse = [[100.0 if rng.random() < 0.4 else 0.0 for _ in range(200)] for _ in range(2)]
    point, low, high = quality.paired_interval([better], [worse])
    assert 20 < point < 40 and 0 < low < point < high
    with pytest.raises(ValueError, match="same test examples"):
        quality.paired_interval([better], [[[0.0] * 10]])


def with_examples(r: dict, each: list[float], **kw) -> dict:
    return {**r, "per_example": each, "score": sum(each) / len(each), **kw}


def test_report_shows_majority_rate_label_spread_and_differences(quality):
    gold = {"negative": 6, "positive": 4}
    constant = [100.0] * 6 + [0.0] * 4  # "negative" to every example: the majority rate, not learning
    results = [
        with_examples(
            scored("iapt", "sentiment", s, 0),
            [100.0] * 9 + [0.0],
            majority_rate=60.0,
            gold_labels=gold,
            predicted_labels={"negative": 5, "positive": 5},
        )
        for s in (1, 2, 3)
    ]
    results += [
        with_examples(
            scored("lora", "sentiment", 1, 0),
            constant,
            majority_rate=60.0,
            gold_labels=gold,
            predicted_labels={"negative": 10},
        )
    ]
    report = quality.write_report(args(tasks=["sentiment"], ablations=[]), results)
    assert "| *majority class* | | | | *60.0* | |" in report
    assert "| lora | 60.0 | 10 | 0 | 0 |" in report, "the constant predictor's spread is shown"
    diff_row = next(line for line in report.splitlines() if line.startswith("| lora | +"))
    assert diff_row.startswith("| lora | +30.0 [")


def test_baselines_get_more_seeds_only_while_their_interval_contains_zero(quality):
    a = args(tasks=["sentiment"], methods=["iapt", "lora", "idpg", "lpt"])
    win = [100.0] * 190 + [0.0] * 10
    results = [with_examples(scored("iapt", "sentiment", 1, 0), win)]
    results += [with_examples(scored("lora", "sentiment", 1, 0), win)]
    results += [with_examples(scored("idpg", "sentiment", 1, 0), [0.0] * 200)]  # clearly below IAPT
    results += [with_examples(scored("lpt", "sentiment", 1, 0), win[:-1] + [100.0])]  # level with IAPT
    assert quality.needs_more_seeds(a, results) == ["iapt", "lora", "lpt"]
    assert quality.missing_cells(a, results, [1]) == set()
    assert quality.missing_cells(a, results, [2]) == {(m, "sentiment", 2) for m in a.methods}


def test_the_chosen_lrs_tuning_cell_is_the_first_seeds_table_cell(quality, tmp_path):
    tuned_cell = with_examples(tuned("iapt", 1e-3, 0.9), [100.0, 0.0], tuning=True, metrics={})
    (tmp_path / "tune-iapt-sentiment-b1000-lr0.001.json").write_text(json.dumps(tuned_cell))
    a = args(results=str(tmp_path), work=str(tmp_path / "work"), tag="q")
    result = quality.run_cell(a, None, None, "iapt", "sentiment", 1, 1000, 1e-3)  # would fail if it trained
    assert result["from_tuning"] and result["score"] == 50.0 and "tuning" not in result
    results = quality.load_results(tmp_path)
    assert [quality.is_scored(r) for r in results] == [True, False]  # the copy counts, the tuning cell does not
    assert quality.choose_lrs(a, results)["iapt"] == 1e-3
