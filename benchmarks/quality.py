"""Quality comparison: methods × tasks × seeds at one parameter budget, resumable, written to QUALITY.md.

Every cell is one `iapt.training.train` run followed by a generation-based test score; its result is a JSON
file under --work, so a killed benchmark continues where it stopped and finished cells are never re-run.

    python benchmarks/quality.py --model default --tasks sentiment nli squad e2e --seeds 1 2 3 \
        --methods iapt lora prompt-tuning prefix idpg lpt --steps 200 --work runs/quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from iapt.io import atomic_write_text
from iapt.models import load_model
from iapt.training import TrainConfig, Trainer, evaluate_task

PRIMARY = {"sentiment": "accuracy", "nli": "accuracy", "squad": "f1", "e2e": "rougeL"}
DEFAULT_METHODS = ["iapt", "lora", "prompt-tuning", "prefix", "idpg", "lpt"]
# Candidate changes of the method first (issue: does IAPT close the gap to LoRA?), then the checks of defaults.
DEFAULT_ABLATIONS = [
    "iapt-sink-vocab",
    "iapt-scaled",
    "iapt-scaled-pool-mean",
    "iapt-scaled-vocab",
    "iapt-kv",
    "iapt-tokens-16",
    "iapt-layers-upper",
    "iapt-layers-even",
    "iapt-zero",
    "iapt-every-1",
    "iapt-fp32",
    "iapt-vocab",
]
IAPT_PAPER_RATIO_BUDGET = 1_579_590  # IAPT at r = 45 on SmolLM2-135M: the paper's r/d = 320/4096 (MiLoRA's re-run)


def method_settings(method: str) -> dict[str, Any]:
    """Benchmark names → TrainConfig settings. IAPT variants chain modifiers after ``iapt``: ``zero`` (the paper's
    zero start), ``pad`` (pad-token anchor; ``anchor`` is its old name), ``vocab`` (anchored on vocabulary tokens),
    ``fp32`` (float32 backbone), ``joint``, ``frozen-<fn>``, ``pool-<mode>``, ``tokens-<n>`` (soft-token count),
    ``every-<k>`` (Θ step every k steps), ``kv`` (keys/values written directly), ``scaled`` (the output in units
    of the anchor's RMS), ``sink`` (the backbone keeps its attention sink in a column before the soft tokens),
    ``layers-<subset>`` (generators on ``upper`` / ``lower`` / ``even`` / ``odd`` layers only, the budget moved
    there), e.g.
    ``iapt-zero-frozen-gelu``."""
    if method != "iapt" and not method.startswith("iapt-"):
        return {"method": method}
    settings: dict[str, Any] = {"method": "iapt", "activation_mode": "bilevel"}
    words = method.split("-")[1:]
    while words:
        word = words.pop(0)
        if word in ("anchor", "pad"):  # "anchor": the name of the pad-token start before starts had modes
            settings["anchor"] = "pad"
        elif word == "zero":
            settings["anchor"] = "none"
        elif word == "vocab":
            settings["anchor"] = "tokens"
        elif word == "fp32":  # the bf16 check: the same cell with a float32 backbone
            settings["dtype"] = "float32"
        elif word == "kv":  # the generator writes the slots' keys and values (IAPTConfig.insertion)
            settings["insertion"] = "kv"
        elif word == "scaled":  # the generator's output in units of the anchor's RMS (IAPTConfig.output_scale)
            settings["output_scale"] = "anchor"
        elif word == "sink":  # a plain slot-token column before the soft tokens (IAPTConfig.sink_token)
            settings["sink_token"] = True
        elif word == "joint":
            settings["activation_mode"] = "joint"
        elif word == "layers" and words:  # generators on a subset of layers, the budget moved there
            value = words.pop(0)
            if value not in LAYER_SUBSETS:
                raise ValueError(f"unknown layer subset {value!r} in {method!r}: one of {list(LAYER_SUBSETS)}")
            settings["layers"] = value  # resolved against the base's layer count by layer_subset
        elif word in ("frozen", "pool", "tokens", "every") and words:
            value = words.pop(0)
            if word == "frozen":
                settings.update(activation_mode="frozen", activation_init=value)
            elif word == "pool":
                settings["pooling"] = value
            elif word == "every":
                settings["rational_every"] = int(value)
            else:
                settings["num_soft_tokens"] = int(value)
        else:
            raise ValueError(
                f"unknown IAPT variant {method!r}: chain zero, pad, vocab, fp32, joint, frozen-<fn>, "
                "pool-<mode>, tokens-<n>, every-<k>, kv, scaled, sink, layers-<subset> after 'iapt'"
            )
    return settings


# Layer subsets of the ``layers-<subset>`` variant (SPT, Zhu & Tan 2023; LPT: prompts on some layers only).
LAYER_SUBSETS: dict[str, Callable[[int], list[int]]] = {
    "upper": lambda n: list(range(n // 2, n)),
    "lower": lambda n: list(range(n // 2)),
    "even": lambda n: list(range(0, n, 2)),
    "odd": lambda n: list(range(1, n, 2)),
}


def layer_subset(settings: dict[str, Any], base: Any) -> dict[str, Any]:
    """Replace a ``layers`` subset name by the base's layer indices."""
    if isinstance(settings.get("layers"), str):
        settings["layers"] = LAYER_SUBSETS[settings["layers"]](base.config.num_hidden_layers)
    return settings


def cached_result(result_file: Path, lr: float) -> dict[str, Any] | None:
    """The finished cell, if it was trained at ``lr``. One trained at another LR (the grid changed since) is moved
    to ``superseded/`` beside it: kept, but out of the tables, and the cell is trained again."""
    if not result_file.is_file():
        return None
    done = json.loads(result_file.read_text())
    if done["lr"] == lr:
        return done
    superseded = result_file.parent / "superseded" / f"{result_file.stem}-lr{done['lr']:g}.json"
    superseded.parent.mkdir(exist_ok=True)
    result_file.replace(superseded)
    return None


def tuning_name(method: str, task: str, budget: int, lr: float) -> str:
    return f"tune-{method}-{task}-b{budget}-lr{lr:g}"


def run_cell(
    args: argparse.Namespace,
    base: Any,
    tokenizer: Any,
    method: str,
    task: str,
    seed: int,
    budget: int,
    lr: float,
    test: bool = True,
    tuning: bool = False,
) -> dict[str, Any]:
    """Train one cell and (unless ``test`` is off) score its best adapter on the test split.

    A tuning cell (``tuning``: the first task and seed, one LR of the grid) is scored too when ``test`` is on, so
    the main-table cell of that task and seed is the tuning cell at the chosen LR, copied, not trained again.
    """
    name = tuning_name(method, task, budget, lr) if tuning else f"{args.tag}-{method}-{task}-b{budget}-s{seed}"
    cell = Path(args.work) / name
    result_file = Path(args.results) / f"{name}.json"  # kept in the repo: a run resumes on another machine
    done = cached_result(result_file, lr)
    if done is not None:
        return done
    if not tuning and task == args.tasks[0] and seed == args.seeds[0]:
        tuned_file = Path(args.results) / f"{tuning_name(method, task, budget, lr)}.json"
        tuned_cell = json.loads(tuned_file.read_text()) if tuned_file.is_file() else {}
        if "score" in tuned_cell and tuned_cell.get("seed") == seed:
            result = {k: v for k, v in tuned_cell.items() if k != "tuning"} | {"method": method, "from_tuning": True}
            atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
            return result
    if cell.exists():
        import shutil

        shutil.rmtree(cell)  # an unfinished cell restarts from scratch: its result was never recorded
    sized = budget
    if method in args.cap:  # a size the budget rule would exceed (prompt tuning: ~2k tokens at IAPT's budget)
        from iapt.methods import count_for, size_for_budget

        if size_for_budget(method, base, budget) > args.cap[method]:
            sized = count_for(method, base, args.cap[method])
    settings = layer_subset(method_settings(method), base)
    dtype = settings.pop("dtype", args.dtype)
    cfg = TrainConfig(
        model=args.model,
        task=task,
        out=str(cell),
        seed=seed,
        budget=sized,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=lr,
        max_length=args.max_length,
        eval_every=args.eval_every or args.steps,
        max_train_examples=args.train_examples,
        max_dev_examples=args.dev_examples,
        dtype=dtype,
        progress=False,
        **settings,
    )
    started = time.perf_counter()
    trainer = Trainer(cfg, base, tokenizer)
    summary = trainer.run()
    result = {
        "method": method,
        "task": task,
        "seed": seed,
        "budget": budget,
        "lr": lr,
        "params": summary["trainable_params"],
        "steps": summary["steps"],
        "dtype": dtype,
        "dev_loss": summary["best_dev_loss"],
        "train_seconds": summary["train_seconds"],
    }
    if tuning:
        result["tuning"] = True
    if not test:
        result["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
        print(f"tune {method:18s} lr {lr:g}: dev loss {result['dev_loss']:.3f} ({result['seconds']:.0f} s)", flush=True)
        return result
    from iapt.adapters import load_adapter

    bare = trainer.unwrapped.unload() if hasattr(trainer.unwrapped, "unload") else trainer.unwrapped.base_model
    model = load_adapter(bare, cell / "adapter")
    report = evaluate_task(
        model, tokenizer, task, "test", args.test_examples, args.eval_batch_size, args.max_length, progress=False
    )
    if hasattr(model, "unload"):
        model.unload()
    result.update(
        metrics=report["metrics"],
        score=report["metrics"][PRIMARY[task]],
        per_example=report["per_example"],
        samples=report["samples"][:3],
        seconds=round(time.perf_counter() - started, 1),
        **{k: report[k] for k in ("majority_rate", "gold_labels", "predicted_labels") if k in report},
    )
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    print(
        f"{method:18s} {task:10s} seed {seed}: {result['score']:.1f} ({result['params']:,d} params, "
        f"{result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def is_tuning(r: dict[str, Any]) -> bool:
    """A tuning cell: marked so (it may carry a test score too), or, in older files, one without a score."""
    return bool(r.get("tuning", "score" not in r))


def is_scored(r: dict[str, Any]) -> bool:
    """A cell of the tables: scored on test, not a tuning cell (the chosen LR's tuning cell is copied into one)."""
    return "score" in r and not is_tuning(r)


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every finished cell in ``results``, whichever run (or resumed run, on whichever machine) produced it."""
    return [json.loads(f.read_text()) for f in sorted(results.glob("*.json"))]


def beyond(tried: Sequence[float], lr: float) -> float | None:
    """The next point past ``lr`` when it is the top or bottom of the LRs ``tried`` (one step of their own ratio
    at that end, rounded to 1 or 3 × 10^k), else None."""
    grid = sorted(set(tried))
    if len(grid) < 2 or lr not in (grid[0], grid[-1]):
        return None
    ratio = grid[1] / grid[0] if lr == grid[0] else grid[-1] / grid[-2]
    raw = lr / ratio if lr == grid[0] else lr * ratio
    exponent = math.floor(math.log10(raw))
    nice = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    return float(f"{min(nice, key=lambda x: abs(math.log(x / raw))):.1e}")


def edge_lrs(args: argparse.Namespace, results: list[dict[str, Any]], method: str) -> list[float]:
    """The LRs beyond the grid that ``method`` gets, in order: while the best LR tried is the top (or bottom) of
    those tried, one more point past it, up to ``--edge`` points, so that a chosen LR is bracketed where the
    grid allows it. Empty until the grid is finished; the last point may still be unfinished (nothing is decided
    past it until it is)."""
    losses = {
        r["lr"]: r["dev_loss"] for r in results if is_tuning(r) and r["method"] == method and r["budget"] == args.budget
    }
    if not args.edge or not all(lr in losses for lr in args.lr_grid):
        return []
    tried, extra = list(args.lr_grid), list[float]()
    while len(extra) < args.edge:
        nxt = beyond(tried, min(tried, key=lambda lr: losses[lr]))
        if nxt is None:
            break
        extra.append(nxt)
        if nxt not in losses:
            break
        tried.append(nxt)
    return extra


def choose_lrs(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, float]:
    """Each method's LR: the grid point (or the point beyond its edge) with the lowest dev loss on the tuning
    cells (the first task)."""
    chosen = {}
    for method in args.methods + args.ablations:
        parent = tuning_method(method, args.tune_ablations)
        if parent in args.fixed_lr:
            chosen[method] = args.fixed_lr[parent]
            continue
        tried = [*args.lr_grid, *edge_lrs(args, results, parent)]
        tuned = [
            r
            for r in results
            if is_tuning(r) and r["method"] == parent and r["budget"] == args.budget and r["lr"] in tried
        ]
        chosen[method] = min(tuned, key=lambda r: r["dev_loss"])["lr"] if tuned else args.lr
    return chosen


def tuned_methods(args: argparse.Namespace) -> list[str]:
    """Methods with their own LR tuning cells, once each (an ablation promoted to ``--methods`` stays one)."""
    return [m for m in dict.fromkeys(args.methods + args.tune_ablations) if m not in args.fixed_lr]


def missing_tuning(
    args: argparse.Namespace, results: list[dict[str, Any]], methods: Sequence[str] | None = None
) -> set[tuple[str, float]]:
    """The (method, LR) tuning cells of this run (of ``methods``: default all) not finished yet, the points
    beyond the grid's edge known so far included; LRs are chosen only when none is missing."""
    done = {(r["method"], r["lr"]) for r in results if is_tuning(r) and r["budget"] == args.budget}
    methods = tuned_methods(args) if methods is None else [m for m in methods if m in tuned_methods(args)]
    wanted = {(m, lr) for m in methods for lr in [*args.lr_grid, *edge_lrs(args, results, m)]}
    return wanted - done


def missing_cells(
    args: argparse.Namespace, results: list[dict[str, Any]], seeds: Sequence[int]
) -> set[tuple[str, str, int]]:
    """The main-table cells of ``seeds`` not finished yet."""
    done = {(r["method"], r["task"], r["seed"]) for r in results if is_scored(r) and r["budget"] == args.budget}
    return {(m, t, s) for m in args.methods for t in args.tasks for s in seeds} - done


def tuning_method(method: str, tuned_separately: Sequence[str] = ()) -> str:
    """IAPT ablations use the LR tuned for IAPT, so that only the ablated part differs, except those that change
    the parametrisation's scale (``--tune-ablations``, e.g. iapt-anchor), which get their own."""
    if method in tuned_separately or not method.startswith("iapt"):
        return method
    parents = [t for t in tuned_separately if method.startswith(t + "-")]  # iapt-anchor-frozen-gelu: iapt-anchor's
    return max(parents, key=len) if parents else "iapt"


def paired_interval(
    ours: Sequence[Sequence[Sequence[float]]],
    theirs: Sequence[Sequence[Sequence[float]]],
    draws: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean difference ours − theirs, averaged over tasks, with a 95% percentile bootstrap interval.

    ``ours[t][s]`` holds the per-example scores of seed s on task t (every seed scores the same test examples,
    in the same order). Each draw resamples, per task, the test examples (shared by both methods: the pairing)
    and each method's seeds, and averages the task differences: the interval covers example and seed noise.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean(a) - np.mean(b) for a, b in zip(ours, theirs, strict=True)]))
    total = np.zeros(draws)
    for a_seeds, b_seeds in zip(ours, theirs, strict=True):
        a, b = np.asarray(a_seeds, dtype=float), np.asarray(b_seeds, dtype=float)  # (seeds, examples)
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"paired scores need the same test examples: {a.shape[1]} vs {b.shape[1]}")
        examples = rng.integers(0, a.shape[1], size=(draws, a.shape[1]))
        a_pick = rng.integers(0, a.shape[0], size=(draws, a.shape[0]))
        b_pick = rng.integers(0, b.shape[0], size=(draws, b.shape[0]))
        a_means = a[:, examples].mean(-1)  # (seeds, draws): each seed's mean over the drawn examples
        b_means = b[:, examples].mean(-1)
        columns = np.arange(draws)
        total += a_means[a_pick.T, columns].mean(0) - b_means[b_pick.T, columns].mean(0)
    total /= len(ours)
    low, high = np.percentile(total, [2.5, 97.5])
    return point, float(low), float(high)


def per_example(results: list[dict[str, Any]], method: str, task: str, budget: int) -> list[list[float]]:
    """Per-example test scores of ``method`` on ``task``, one list per seed (seed order)."""
    mine = sorted(
        (
            r
            for r in results
            if is_scored(r)
            and r["method"] == method
            and r["task"] == task
            and r["budget"] == budget
            and "per_example" in r
        ),
        key=lambda r: r["seed"],
    )
    return [r["per_example"] for r in mine]


def difference(
    args: argparse.Namespace, results: list[dict[str, Any]], ours: str, theirs: str, tasks: Sequence[str]
) -> tuple[float, float, float] | None:
    """IAPT − baseline over ``tasks`` with its interval, or None while a task lacks either method."""
    a = [per_example(results, ours, t, args.budget) for t in tasks]
    b = [per_example(results, theirs, t, args.budget) for t in tasks]
    if not all(a) or not all(b):
        return None
    return paired_interval(a, b)


def needs_more_seeds(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[str]:
    """Methods that get every seed: IAPT, LoRA, and each baseline whose interval against IAPT on the mean still
    contains 0 after the first seed (or cannot be computed yet)."""
    ours = args.methods[0]
    keep = [ours] + [m for m in args.always_seeded if m in args.methods and m != ours]
    for method in args.methods:
        if method in keep:
            continue
        diff = difference(args, results, ours, method, args.tasks)
        if diff is None or diff[1] <= 0 <= diff[2]:
            keep.append(method)
    return keep


def differences_table(args: argparse.Namespace, results: list[dict[str, Any]]) -> list[str]:
    ours = args.methods[0]
    lines = [
        f"| {ours} − baseline | " + " | ".join(args.tasks) + " | mean |",
        "|---|" + "---:|" * (len(args.tasks) + 1),
    ]
    for method in args.methods[1:]:
        cells = []
        for tasks in [[t] for t in args.tasks] + [args.tasks]:
            diff = difference(args, results, ours, method, tasks)
            cells.append("—" if diff is None else f"{diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def labels_table(args: argparse.Namespace, results: list[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """What each method answers on the classification tasks (first seed), beside the gold distribution."""
    lines = []
    for task in args.tasks:
        cells = {
            m: r
            for r in results
            if is_scored(r)
            and r["task"] == task
            and r["seed"] == args.seeds[0]
            and r["budget"] == args.budget
            and "predicted_labels" in r
            for m in [r["method"]]
            if m in methods
        }
        if not cells:
            continue
        gold = next(iter(cells.values()))["gold_labels"]
        names = list(gold) + ["(none)"]
        lines += [
            "",
            f"**{task}** (seed {args.seeds[0]}, {sum(gold.values())} test examples): answers per label; "
            "(none) = names no label or several",
            "",
            "| | accuracy | " + " | ".join(names) + " |",
            "|---|---:|" + "---:|" * len(names),
            "| gold | | " + " | ".join(str(gold.get(n, 0)) for n in names) + " |",
        ]
        for method in methods:
            if method in cells:
                pred = cells[method]["predicted_labels"]
                lines.append(
                    f"| {method} | {cells[method]['score']:.1f} | "
                    + " | ".join(str(pred.get(n, 0)) for n in names)
                    + " |"
                )
    return lines


def table(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    methods: list[str],
    seeds: Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
) -> list[str]:
    tasks = list(tasks or args.tasks)
    lines = [
        "| method | trainable params | LR | seeds | " + " | ".join(tasks) + " | mean |",
        "|---|---:|---:|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for method in methods:
        mine = [
            r
            for r in results
            if is_scored(r)
            and r["method"] == method
            and r["budget"] == args.budget
            and r["task"] in tasks
            and (seeds is None or r["seed"] in seeds)
        ]
        if not mine:
            continue
        scores, cells = [], []
        for task in tasks:
            vals = sorted(r["score"] for r in mine if r["task"] == task)
            if vals:
                scores.append(statistics.mean(vals))
                spread = f" ({vals[0]:.1f}–{vals[-1]:.1f})" if len(vals) > 1 else ""
                cells.append(f"{scores[-1]:.1f}{spread}")
            else:
                cells.append("—")
        mean = f"**{statistics.mean(scores):.1f}**" if len(scores) == len(tasks) else "—"
        counts = [len({r["seed"] for r in mine if r["task"] == task}) for task in tasks]
        counts = [c for c in counts if c]  # seeds per task done; a task not started shows "—" in its column
        seed_count = str(max(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
        lines.append(
            f"| {method} | {mine[0]['params']:,d} | {mine[0]['lr']:g} | {seed_count} | "
            + " | ".join(cells)
            + f" | {mean} |"
        )
    majority = {r["task"]: r["majority_rate"] for r in results if is_scored(r) and "majority_rate" in r}
    if majority:  # the trivial answer, beside every accuracy
        lines.append(
            "| *majority class* | | | | "
            + " | ".join(f"*{majority[t]:.1f}*" if t in majority else "" for t in tasks)
            + " | |"
        )
    return lines


def write_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    tests = [r for r in results if is_scored(r)]
    tunes = [r for r in results if is_tuning(r)]
    cell_minutes = sum(r["seconds"] for r in results) / 60
    dtypes = sorted({r.get("dtype", "float32") for r in results}) or [args.dtype]
    train_note = f", the first {args.train_examples} training examples" if args.train_examples else ""
    lines = [
        f"## {args.model} — budget {args.budget:,d} trainable parameters",
        "",
        (
            f"Test score, mean over seeds (range in brackets); sentiment/nli: accuracy, squad: F1, e2e: ROUGE-L, "
            f"in percent. Each cell: {args.steps} optimiser steps of {args.batch_size} examples{train_note}, max "
            f"length {args.max_length}, the adapter with the best dev loss ({args.dev_examples} dev examples), "
            f"scored by greedy generation on the first {args.test_examples} test examples (fewer where the split "
            f"is smaller). {len(tests)} scored cells + {len(tunes)} LR-tuning cells, {cell_minutes:.0f} min of "
            f"cell time on {platform.machine()} (torch threads per worker: {args.threads}, backbone "
            f"{'/'.join(dtypes)}, torch {torch.__version__})."
        ),
        "",
    ]
    if args.fixed_lr:
        lines += [
            "LRs given, not tuned in this run (`--fixed-lr`): "
            + ", ".join(f"{k} {v:g}" for k, v in args.fixed_lr.items())
            + ".",
            "",
        ]
    if args.cap:
        lines += [
            "Size caps (the budget rule would exceed them; the parameter column is exact): "
            + ", ".join(f"{k} {v}" for k, v in args.cap.items())
            + ".",
            "",
        ]
    lines += ["### Methods at the budget", ""]
    lines += table(args, results, args.methods)
    lines += [
        "",
        f"### {args.methods[0]} − each baseline: mean difference [95% bootstrap interval]",
        "",
        "Paired by test example; the interval resamples test examples and seeds (each method's own seeds); "
        "the mean column averages the task differences. An interval above 0 is a win, one containing 0 is "
        "not a difference.",
        "",
    ]
    lines += differences_table(args, results)
    spread = labels_table(args, results, args.methods + args.ablations)
    if spread:
        lines += ["", "### Predicted labels (classification tasks)"] + spread
    if args.ablations:
        own = [m for m in args.ablations if tuning_method(m, args.tune_ablations) != "iapt"]  # the LR column says
        lines += [
            "",
            "### IAPT ablations (seed "
            + str(args.seeds[0])
            + "; IAPT's LR"
            + (f", except {', '.join(own)}: their own LR (tuned, or fixed by --fixed-lr)" if own else "")
            + ")",
            "",
        ]
        ablation_tasks = args.ablation_tasks or args.tasks
        lines += table(args, results, ["iapt"] + args.ablations, seeds=args.seeds[:1], tasks=ablation_tasks)
        lines += [
            "",
            f"iapt − ablation over {', '.join(ablation_tasks)} (iapt: all its seeds; the ablation: "
            "its one seed, so its seed noise is not in the interval): "
            + "; ".join(
                f"{m} {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]"
                for m in args.ablations
                if (d := difference(args, results, "iapt", m, ablation_tasks)) is not None
            ),
        ]
    if tunes:
        columns = sorted({*args.lr_grid, *(r["lr"] for r in tunes if r["budget"] == args.budget)})
        lines += [
            "",
            (
                f"### LR tuning (task {args.tasks[0]}, seed {args.seeds[0]}, dev loss after {args.steps} "
                "steps; lowest chosen; the chosen LR's cell is that task's seed-1 table cell)"
            ),
            "",
            "| method | " + " | ".join(f"{lr:g}" for lr in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for method in dict.fromkeys(args.methods + args.tune_ablations):  # fixed LRs too: their earlier tuning
            row = {r["lr"]: r["dev_loss"] for r in tunes if r["method"] == method}
            if row:
                lines.append(
                    f"| {method} | " + " | ".join(f"{row[lr]:.3f}" if lr in row else "—" for lr in columns) + " |"
                )
    sweep = [r for r in tests if r["budget"] != args.budget]
    if sweep:
        lines += [
            "",
            "### Budget sweep (seed " + str(args.seeds[0]) + ")",
            "",
            "| method | trainable params | " + " | ".join(args.sweep_tasks) + " |",
            "|---|---:|" + "---:|" * len(args.sweep_tasks),
        ]
        for r_method in ("iapt", "lora"):
            for params in sorted(
                {r["params"] for r in tests if r["method"] == r_method and r["seed"] == args.seeds[0]}
            ):
                row = {
                    r["task"]: r["score"]
                    for r in tests
                    if r["method"] == r_method and r["params"] == params and r["seed"] == args.seeds[0]
                }
                lines.append(
                    f"| {r_method} | {params:,d} | "
                    + " | ".join(f"{row[t]:.1f}" if t in row else "—" for t in args.sweep_tasks)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def plot_budgets(args: argparse.Namespace, results: list[dict[str, Any]], path: Path) -> None:
    """Score (mean over the sweep tasks, first seed) against trainable parameters, IAPT and LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in ("iapt", "lora"):
        by_params: dict[int, dict[str, float]] = {}
        for r in results:
            if is_scored(r) and r["method"] == method and r["seed"] == args.seeds[0] and r["task"] in args.sweep_tasks:
                by_params.setdefault(r["params"], {})[r["task"]] = r["score"]
        xs = sorted(x for x, row in by_params.items() if len(row) == len(args.sweep_tasks))
        if xs:
            ax.plot(xs, [statistics.mean(by_params[x].values()) for x in xs], "o-", label=method)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short range
    ax.set_title(f"seed {args.seeds[0]}, {args.steps} steps of {args.batch_size}", fontsize=9)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"score, mean over {', '.join(args.sweep_tasks)}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


BEGIN, END = "<!-- quality.py: begin -->", "<!-- quality.py: end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Replace only the generated part of the report, keeping the prose written around it."""
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + BEGIN + "\n" + text + old[old.index(END) :]
    else:
        new = old + ("\n" if old else "") + BEGIN + "\n" + text + END + "\n"
    atomic_write_text(path, new)


def claim(work: Path, key: str) -> bool:
    """Take a cell for this process unless a live one holds it or it is finished (result files are checked
    by run_cell); a lock left by a killed worker is taken over."""
    lock = work / ".locks" / key
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.mkdir()
    except FileExistsError:
        try:
            owner = int((lock / "pid").read_text())
            os.kill(owner, 0)
            return owner == os.getpid()
        except (OSError, ValueError):
            pass  # the owner is gone (or never wrote its pid): take the cell over
    (lock / "pid").write_text(str(os.getpid()))
    return True


def method_values(
    parser: argparse.ArgumentParser, flag: str, items: Sequence[str], cast: Callable[[str], Any]
) -> dict[str, Any]:
    """``METHOD=VALUE`` arguments as a dict; a malformed one is a usage error naming the flag, not a traceback."""
    values = {}
    for item in items:
        method, sep, value = item.partition("=")
        try:
            values[method] = cast(value)
        except ValueError:
            sep = ""
        if not sep or not method:
            parser.error(f'{flag} takes METHOD=VALUE items (a method name, "=", a number), got {item!r}')
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", nargs="+", default=["sentiment", "nli", "squad", "e2e"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument(
        "--ablations",
        nargs="*",
        default=DEFAULT_ABLATIONS,
        help="IAPT variants, run on every task with the first seed only, at IAPT's tuned LR",
    )
    p.add_argument(
        "--ablation-tasks",
        nargs="*",
        default=["sentiment", "squad"],
        help="tasks the ablations run on (first seed); empty = all of --tasks",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument(
        "--always-seeded",
        nargs="*",
        default=["lora"],
        help="methods run on every seed besides the first method; the other baselines get seeds after "
        "the first only while their interval against the first method contains 0",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=IAPT_PAPER_RATIO_BUDGET,
        help="trainable parameters (default: IAPT r=45 on SmolLM2-135M, the paper's bottleneck ratio)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="LR of every method when --lr-grid is empty")
    p.add_argument(
        "--lr-grid",
        nargs="*",
        type=float,
        default=[3e-4, 1e-3, 3e-3],
        help="LRs tried per method on the first task and seed (dev loss, no test); the lowest wins",
    )
    p.add_argument(
        "--edge",
        type=int,
        default=2,
        help="points tried beyond the grid's top (or bottom), one at a time, while a method's best LR is there "
        "(0: the grid alone)",
    )
    p.add_argument(
        "--sweep-budgets",
        nargs="*",
        type=int,
        default=[],
        help="extra budgets for the IAPT-vs-LoRA plot (first seed, --sweep-tasks)",
    )
    p.add_argument("--sweep-tasks", nargs="+", default=["sentiment", "e2e"])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--eval-every", type=int, default=None, help="dev loss every N steps (default: at the end only)")
    p.add_argument(
        "--train-examples",
        type=int,
        default=1000,
        help="the first N training examples (one epoch = N / batch size steps)",
    )
    p.add_argument("--dev-examples", type=int, default=100)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", help="backbone dtype (adapters train in float32 either way)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cap",
        nargs="*",
        default=["prompt-tuning=100"],
        help="METHOD=SIZE: never larger than this (prompt tuning at IAPT's budget would be 1,959 tokens "
        "per sequence: 13+ GB and ~15x the compute here); the table shows the exact count",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="processes taking cells in parallel (threads each: --threads)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default="runs/quality", help="run folders (adapters, checkpoints, logs)")
    p.add_argument(
        "--results",
        default="benchmarks/quality-results",
        help="one JSON per finished cell (commit it: a run resumes from it anywhere)",
    )
    p.add_argument(
        "--tune-ablations",
        nargs="*",
        default=["iapt-zero"],
        help="ablations that get their own LR tuning instead of IAPT's LR",
    )
    p.add_argument(
        "--fixed-lr",
        nargs="*",
        default=[],
        help="METHOD=LR: use this LR instead of tuning one (e.g. LRs tuned by an earlier, shorter run)",
    )
    p.add_argument("--report-only", action="store_true", help="rewrite QUALITY.md from --results and stop")
    p.add_argument(
        "--seeds-first",
        type=int,
        default=None,
        help="run only this many seeds of the main table before the ablations and the sweep",
    )
    p.add_argument("--tag", default="q")
    p.add_argument("--report", default="benchmarks/QUALITY.md", help="where the tables go (written after every cell)")
    args = p.parse_args()
    args.cap = method_values(p, "--cap", args.cap, int)
    args.fixed_lr = method_values(p, "--fixed-lr", args.fixed_lr, float)
    if args.report_only:  # rewrite the tables from the committed results, train nothing
        results = load_results(Path(args.results))
        write_between_markers(Path(args.report), write_report(args, results))
        if args.sweep_budgets:
            plot_budgets(args, results, Path(args.report).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    work, results_dir = Path(args.work), Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.workers > 1 and not args.worker:
        import subprocess
        import sys

        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        procs = [subprocess.Popen([sys.executable, *sys.argv, "--worker"], env=env) for _ in range(args.workers)]
        raise SystemExit(max(p.wait() for p in procs))

    def cell(
        method: str, task: str, seed: int, budget: int, lr: float, test: bool = True, tuning: bool = False
    ) -> None:
        dtype = method_settings(method).get("dtype", args.dtype)
        base, tokenizer = load_model(args.model, dtype=dtype)  # a fresh, untouched backbone per cell
        run_cell(args, base, tokenizer, method, task, seed, budget, lr, test, tuning)
        results = load_results(results_dir)
        write_between_markers(Path(args.report), write_report(args, results))
        if args.sweep_budgets:
            plot_budgets(args, results, Path(args.report).with_suffix(".png"))

    # Order: first the methods every seed needs (IAPT, --always-seeded, ablations with their own LR): their LR
    # tuning (each tuning cell scored, so the chosen LR's cell is the first task's seed-1 cell; a method whose
    # best LR is an edge of the grid gets points beyond it, one at a time, while its best is there), their first
    # seed on the ablation tasks, the
    # ablations (method by method, so a candidate change is judged on every ablation task early), their first
    # seed on the other tasks. Then the other baselines' tuning and first seed; then the other seeds for the
    # methods that need them (IAPT, LoRA, and each baseline whose interval against IAPT still contains 0); then
    # the budget sweep. Several workers (--workers k, one thread each, use a small machine better than one process
    # with k threads) take the next unclaimed cell, each claim a lock folder; a barrier (a callable) holds every
    # worker until what comes after it can be decided.
    Cell = tuple[str, str, int, int, "str | float", bool]
    ours = args.methods[0]
    leading = [m for m in tuned_methods(args) if m == ours or m in args.always_seeded or m in args.tune_ablations]
    trailing = [m for m in tuned_methods(args) if m not in leading]
    first = args.seeds[: args.seeds_first or 1]
    ablation_tasks = args.ablation_tasks or args.tasks

    def main_table(seeds: Sequence[int], methods: Sequence[str], tasks: Sequence[str]) -> Iterator[Cell]:
        for seed in seeds:
            for task in tasks:
                for method in methods:
                    yield method, task, seed, args.budget, "tuned", True

    def tuning(methods: Sequence[str]) -> Iterator[Cell | Callable[[], bool]]:
        for method in methods:
            for lr in args.lr_grid:
                yield method, args.tasks[0], args.seeds[0], args.budget, lr, True
        for k in range(1, args.edge + 1):  # the k-th point beyond the edge, resolved when it can be (run())
            for method in methods:
                yield method, args.tasks[0], args.seeds[0], args.budget, f"edge-{k}", True

    def cells() -> Iterator[Cell | Callable[[], bool]]:
        lead = [m for m in args.methods if m not in trailing]
        yield from tuning(leading)
        yield from main_table(first, lead, [t for t in args.tasks if t in ablation_tasks])
        for method in args.ablations:
            for task in ablation_tasks:
                yield method, task, args.seeds[0], args.budget, "tuned", True
        yield from main_table(first, lead, [t for t in args.tasks if t not in ablation_tasks])
        yield from tuning(trailing)
        yield from main_table(first, [m for m in args.methods if m in trailing], args.tasks)
        # which baselines need more seeds depends on every first-seed cell
        yield lambda: not missing_cells(args, load_results(results_dir), first)
        yield from main_table(args.seeds[len(first) :], needs_more_seeds(args, load_results(results_dir)), args.tasks)
        for budget in args.sweep_budgets:
            for task in args.sweep_tasks:
                for method in ("iapt", "lora"):
                    yield method, task, args.seeds[0], budget, "tuned", True

    def run(item: Cell) -> bool:
        """Run (or skip, if finished or claimed) one cell; False when it cannot be decided yet: its method's LR is
        not chosen, or (an ``edge-k`` cell) whether there is a k-th point beyond the grid is not known."""
        method, task, seed, budget, lr, test = item
        tuning_cell = lr != "tuned"
        if isinstance(lr, str) and lr.startswith("edge-"):
            results = load_results(results_dir)
            edges, k = edge_lrs(args, results, method), int(lr.removeprefix("edge-"))
            if len(edges) < k:
                return not missing_tuning(args, results, [method])  # all done: there is no k-th point
            rate = edges[k - 1]
        elif not tuning_cell:
            results = load_results(results_dir)
            if missing_tuning(args, results, [tuning_method(method, args.tune_ablations)]):
                return False
            rate = choose_lrs(args, results)[method]
        else:
            rate = float(lr)
        if claim(work, f"{method}-{task}-{seed}-{budget}-{rate:g}-{test}-{tuning_cell}"):
            cell(method, task, seed, budget, rate, test, tuning_cell)
        return True

    # A cell whose LR is still being tuned waits aside while the worker goes on with the next cells.
    deferred: list[Cell] = []
    for item in cells():
        while callable(item) and not item():
            before = len(deferred)
            deferred = [d for d in deferred if not run(d)]
            if len(deferred) == before:
                time.sleep(5)
        if callable(item):
            continue
        deferred = [d for d in deferred if not run(d)]
        if not run(item):
            deferred.append(item)
    while deferred:
        deferred = [d for d in deferred if not run(d)]
        if deferred:
            time.sleep(5)
    print(write_report(args, load_results(results_dir)))


if __name__ == "__main__":
    main()
