"""Quality comparison: methods × tasks × seeds at one parameter budget, resumable, written to QUALITY.md.

Every cell is one `iapt.training.train` run followed by a generation-based test score; its result is a JSON
file under --work, so a killed benchmark continues where it stopped and finished cells are never re-run.

    python benchmarks/quality.py --model default --tasks sentiment nli squad e2e --seeds 1 2 3 \
        --methods iapt lora prompt-tuning prefix idpg lpt --steps 200 --work runs/quality
"""

from __future__ import annotations

import argparse
import json
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
DEFAULT_ABLATIONS = ["iapt-anchor", "iapt-frozen-gelu", "iapt-frozen-relu", "iapt-joint"]


def method_settings(method: str) -> dict[str, Any]:
    """Benchmark names → TrainConfig settings. IAPT variants chain modifiers after ``iapt``: ``anchor``, ``joint``,
    ``frozen-<fn>``, ``pool-<mode>``, ``tokens-<n>`` (e.g. ``iapt-anchor-frozen-gelu``)."""
    if method != "iapt" and not method.startswith("iapt-"):
        return {"method": method}
    settings: dict[str, Any] = {"method": "iapt", "activation_mode": "bilevel"}
    words = method.split("-")[1:]
    while words:
        word = words.pop(0)
        if word == "anchor":
            settings["anchor"] = True
        elif word == "joint":
            settings["activation_mode"] = "joint"
        elif word in ("frozen", "pool", "tokens") and words:
            value = words.pop(0)
            if word == "frozen":
                settings.update(activation_mode="frozen", activation_init=value)
            elif word == "pool":
                settings["pooling"] = value
            else:
                settings["num_soft_tokens"] = int(value)
        else:
            raise ValueError(f"unknown IAPT variant {method!r}: chain anchor, joint, frozen-<fn>, pool-<mode>, "
                             "tokens-<n> after 'iapt'")
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


def run_cell(args: argparse.Namespace, base: Any, tokenizer: Any, method: str, task: str, seed: int,
             budget: int, lr: float, test: bool = True) -> dict[str, Any]:
    """Train one cell and (unless ``test`` is off, as for LR tuning) score its best adapter on the test split."""
    name = f"{args.tag}-{method}-{task}-b{budget}-s{seed}" if test else f"tune-{method}-{task}-b{budget}-lr{lr:g}"
    cell = Path(args.work) / name
    result_file = Path(args.results) / f"{name}.json"  # kept in the repo: a run resumes on another machine
    done = cached_result(result_file, lr)
    if done is not None:
        return done
    if cell.exists():
        import shutil

        shutil.rmtree(cell)  # an unfinished cell restarts from scratch: its result was never recorded
    sized = budget
    if method in args.cap:  # a size the budget rule would exceed (prompt tuning: ~2k tokens at IAPT's budget)
        from iapt.baselines import count_for, size_for_budget

        if size_for_budget(method, base, budget) > args.cap[method]:
            sized = count_for(method, base, args.cap[method])
    cfg = TrainConfig(model=args.model, task=task, out=str(cell), seed=seed, budget=sized, max_steps=args.steps,
                      batch_size=args.batch_size, lr=lr, max_length=args.max_length,
                      eval_every=args.eval_every or args.steps, max_train_examples=args.train_examples,
                      max_dev_examples=args.dev_examples, progress=False, **method_settings(method))
    started = time.perf_counter()
    trainer = Trainer(cfg, base, tokenizer)
    summary = trainer.run()
    result = {"method": method, "task": task, "seed": seed, "budget": budget, "lr": lr,
              "params": summary["trainable_params"], "steps": summary["steps"],
              "dev_loss": summary["best_dev_loss"], "train_seconds": summary["train_seconds"]}
    if not test:
        result["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
        print(f"tune {method:18s} lr {lr:g}: dev loss {result['dev_loss']:.3f} ({result['seconds']:.0f} s)", flush=True)
        return result
    from iapt.adapters import load_adapter

    bare = trainer.unwrapped.unload() if hasattr(trainer.unwrapped, "unload") else trainer.unwrapped.base_model
    model = load_adapter(bare, cell / "adapter")
    report = evaluate_task(model, tokenizer, task, "test", args.test_examples, args.eval_batch_size, args.max_length,
                           progress=False)
    if hasattr(model, "unload"):
        model.unload()
    result.update(metrics=report["metrics"], score=report["metrics"][PRIMARY[task]],
                  samples=report["samples"][:3], seconds=round(time.perf_counter() - started, 1))
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    print(f"{method:18s} {task:10s} seed {seed}: {result['score']:.1f} ({result['params']:,d} params, "
          f"{result['seconds']:.0f} s)", flush=True)
    return result


def load_results(results: Path) -> list[dict[str, Any]]:
    """Every finished cell in ``results``, whichever run (or resumed run, on whichever machine) produced it."""
    return [json.loads(f.read_text()) for f in sorted(results.glob("*.json"))]


def choose_lrs(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, float]:
    """Each method's LR: the grid point with the lowest dev loss on the tuning cells (the first task)."""
    chosen = {}
    for method in args.methods + args.ablations:
        parent = tuning_method(method, args.tune_ablations)
        if parent in args.fixed_lr:
            chosen[method] = args.fixed_lr[parent]
            continue
        tuned = [r for r in results if "score" not in r and r["method"] == parent and r["budget"] == args.budget
                 and r["lr"] in args.lr_grid]
        chosen[method] = min(tuned, key=lambda r: r["dev_loss"])["lr"] if tuned else args.lr
    return chosen


def tuned_methods(args: argparse.Namespace) -> list[str]:
    """Methods with their own LR tuning cells, once each (an ablation promoted to ``--methods`` stays one)."""
    return [m for m in dict.fromkeys(args.methods + args.tune_ablations) if m not in args.fixed_lr]


def missing_tuning(args: argparse.Namespace, results: list[dict[str, Any]]) -> set[tuple[str, float]]:
    """The (method, LR) tuning cells of this run not finished yet; LRs are chosen only when none is."""
    done = {(r["method"], r["lr"]) for r in results if "score" not in r and r["budget"] == args.budget}
    return {(m, lr) for m in tuned_methods(args) for lr in args.lr_grid} - done


def tuning_method(method: str, tuned_separately: Sequence[str] = ()) -> str:
    """IAPT ablations use the LR tuned for IAPT, so that only the ablated part differs, except those that change
    the parametrisation's scale (``--tune-ablations``, e.g. iapt-anchor), which get their own."""
    if method in tuned_separately or not method.startswith("iapt"):
        return method
    parents = [t for t in tuned_separately if method.startswith(t + "-")]  # iapt-anchor-frozen-gelu: iapt-anchor's
    return max(parents, key=len) if parents else "iapt"


def table(args: argparse.Namespace, results: list[dict[str, Any]], methods: list[str],
          seeds: Sequence[int] | None = None) -> list[str]:
    tasks = args.tasks
    lines = ["| method | trainable params | LR | seeds | " + " | ".join(tasks) + " | mean |",
             "|---|---:|---:|---:|" + "---:|" * (len(tasks) + 1)]
    for method in methods:
        mine = [r for r in results if "score" in r and r["method"] == method and r["budget"] == args.budget
                and r["task"] in tasks and (seeds is None or r["seed"] in seeds)]
        if not mine:
            continue
        scores, cells = [], []
        for task in tasks:
            vals = sorted(r["score"] for r in mine if r["task"] == task)
            if vals:
                scores.append(statistics.median(vals))
                spread = f" ({vals[0]:.1f}–{vals[-1]:.1f})" if len(vals) > 1 else ""
                cells.append(f"{scores[-1]:.1f}{spread}")
            else:
                cells.append("—")
        mean = f"**{statistics.mean(scores):.1f}**" if len(scores) == len(tasks) else "—"
        counts = [len({r["seed"] for r in mine if r["task"] == task}) for task in tasks]
        seed_count = str(max(counts)) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"
        lines.append(f"| {method} | {mine[0]['params']:,d} | {mine[0]['lr']:g} | {seed_count} | "
                     + " | ".join(cells) + f" | {mean} |")
    return lines


def write_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    tests = [r for r in results if "score" in r]
    tunes = [r for r in results if "score" not in r]
    cell_minutes = sum(r["seconds"] for r in results) / 60
    lines = [f"## {args.model} — budget {args.budget:,d} trainable parameters", "",
             (f"Test score, median over seeds (range in brackets); sentiment/nli: accuracy, squad: F1, e2e: ROUGE-L, "
             f"in percent. Each cell: {args.steps} optimiser steps of {args.batch_size} examples, max length "
             f"{args.max_length}, the adapter with the best dev loss ({args.dev_examples} dev examples), scored by "
             f"greedy generation on the first {args.test_examples} test examples. "
             f"{len(tests)} scored cells + {len(tunes)} LR-tuning cells, {cell_minutes:.0f} min of cell time on "
             f"{platform.machine()} (torch threads per worker: {args.threads}, float32, torch {torch.__version__})."), "",
             ]
    if args.fixed_lr:
        lines += ["LRs given, not tuned in this run (`--fixed-lr`): "
                  + ", ".join(f"{k} {v:g}" for k, v in args.fixed_lr.items()) + ".", ""]
    if args.cap:
        lines += ["Size caps (the budget rule would exceed them; the parameter column is exact): "
                  + ", ".join(f"{k} {v}" for k, v in args.cap.items()) + ".", ""]
    lines += ["### Methods at the budget", ""]
    lines += table(args, results, args.methods)
    if args.ablations:
        own = [m for m in args.ablations if tuning_method(m, args.tune_ablations) != "iapt"]  # the LR column says
        lines += ["", "### IAPT ablations (seed " + str(args.seeds[0]) + "; IAPT's LR"
                  + (f", except {', '.join(own)}: their own tuned LR" if own else "") + ")", ""]
        lines += table(args, results, ["iapt"] + args.ablations, seeds=args.seeds[:1])
    if tunes:
        lines += ["", (f"### LR tuning (task {args.tasks[0]}, seed {args.seeds[0]}, dev loss after {args.steps} "
                       "steps; lowest chosen)"), "", "| method | " + " | ".join(f"{lr:g}" for lr in args.lr_grid) + " |",
                  "|---|" + "---:|" * len(args.lr_grid)]
        for method in dict.fromkeys(args.methods + args.tune_ablations):  # fixed LRs too: their earlier tuning
            row = {r["lr"]: r["dev_loss"] for r in tunes if r["method"] == method}
            if row:
                lines.append(f"| {method} | " + " | ".join(f"{row[lr]:.3f}" if lr in row else "—"
                                                        for lr in args.lr_grid) + " |")
    sweep = [r for r in tests if r["budget"] != args.budget]
    if sweep:
        lines += ["", "### Budget sweep (seed " + str(args.seeds[0]) + ")", "",
                  "| method | trainable params | " + " | ".join(args.sweep_tasks) + " |",
                  "|---|---:|" + "---:|" * len(args.sweep_tasks)]
        for r_method in ("iapt", "lora"):
            for params in sorted({r["params"] for r in tests if r["method"] == r_method and r["seed"] == args.seeds[0]}):
                row = {r["task"]: r["score"] for r in tests if r["method"] == r_method and r["params"] == params
                       and r["seed"] == args.seeds[0]}
                lines.append(f"| {r_method} | {params:,d} | "
                             + " | ".join(f"{row[t]:.1f}" if t in row else "—" for t in args.sweep_tasks) + " |")
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
            if "score" in r and r["method"] == method and r["seed"] == args.seeds[0] and r["task"] in args.sweep_tasks:
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
        new = old[: old.index(BEGIN)] + BEGIN + "\n" + text + old[old.index(END):]
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


def method_values(parser: argparse.ArgumentParser, flag: str, items: Sequence[str], cast: Callable[[str], Any]
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
            parser.error(f"{flag} takes METHOD=VALUE items (a method name, \"=\", a number), got {item!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", nargs="+", default=["sentiment", "nli", "squad", "e2e"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--ablations", nargs="*", default=DEFAULT_ABLATIONS,
                   help="IAPT variants, run on every task with the first seed only, at IAPT's tuned LR")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--budget", type=int, default=1_128_360, help="trainable parameters (IAPT r=32 on SmolLM2-135M)")
    p.add_argument("--lr", type=float, default=1e-3, help="LR of every method when --lr-grid is empty")
    p.add_argument("--lr-grid", nargs="*", type=float, default=[3e-4, 1e-3, 3e-3],
                   help="LRs tried per method on the first task and seed (dev loss, no test); the lowest wins")
    p.add_argument("--sweep-budgets", nargs="*", type=int, default=[],
                   help="extra budgets for the IAPT-vs-LoRA plot (first seed, --sweep-tasks)")
    p.add_argument("--sweep-tasks", nargs="+", default=["sentiment", "e2e"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=None, help="dev loss every N steps (default: at the end only)")
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--dev-examples", type=int, default=64)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cap", nargs="*", default=["prompt-tuning=100"],
                   help="METHOD=SIZE: never larger than this (prompt tuning at IAPT's budget would be 1,959 tokens "
                        "per sequence: 13+ GB and ~15x the compute here); the table shows the exact count")
    p.add_argument("--workers", type=int, default=1, help="processes taking cells in parallel (threads each: --threads)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default="runs/quality", help="run folders (adapters, checkpoints, logs)")
    p.add_argument("--results", default="benchmarks/quality-results",
                   help="one JSON per finished cell (commit it: a run resumes from it anywhere)")
    p.add_argument("--tune-ablations", nargs="*", default=["iapt-anchor"],
                   help="ablations that get their own LR tuning instead of IAPT's LR")
    p.add_argument("--fixed-lr", nargs="*", default=[],
                   help="METHOD=LR: use this LR instead of tuning one (e.g. LRs tuned by an earlier, shorter run)")
    p.add_argument("--report-only", action="store_true", help="rewrite QUALITY.md from --results and stop")
    p.add_argument("--seeds-first", type=int, default=None,
                   help="run only this many seeds of the main table before the ablations and the sweep")
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

    def cell(method: str, task: str, seed: int, budget: int, lr: float, test: bool = True) -> None:
        base, tokenizer = load_model(args.model)  # a fresh, untouched backbone per cell
        run_cell(args, base, tokenizer, method, task, seed, budget, lr, test)
        results = load_results(results_dir)
        write_between_markers(Path(args.report), write_report(args, results))
        if args.sweep_budgets:
            plot_budgets(args, results, Path(args.report).with_suffix(".png"))

    # Order: LR tuning, then whole seeds of the main table (so an interrupted run leaves complete seeds), then
    # the ablations, then the budget sweep. Several workers (--workers k, one thread each, use a small machine
    # better than one process with k threads) take the next unclaimed cell, each claim a lock folder.
    def main_table(seeds: Sequence[int]) -> Iterator[tuple[str, str, int, int, str | float, bool]]:
        for seed in seeds:
            for task in args.tasks:
                for method in args.methods:
                    yield method, task, seed, args.budget, "tuned", True

    def cells() -> Iterator[tuple[str, str, int, int, str | float, bool]]:
        for method in tuned_methods(args):
            for lr in args.lr_grid:
                yield method, args.tasks[0], args.seeds[0], args.budget, lr, False
        yield "", "", 0, 0, "wait", False  # every worker needs every LR choice before going on
        first = args.seeds[: args.seeds_first or len(args.seeds)]
        yield from main_table(first)
        for task in args.tasks:
            for method in args.ablations:
                yield method, task, args.seeds[0], args.budget, "tuned", True
        for budget in args.sweep_budgets:
            for task in args.sweep_tasks:
                for method in ("iapt", "lora"):
                    yield method, task, args.seeds[0], budget, "tuned", True
        yield from main_table(args.seeds[len(first):])

    lrs: dict[str, float] = {}
    for method, task, seed, budget, lr, test in cells():
        if lr == "wait":
            while missing_tuning(args, load_results(results_dir)):
                time.sleep(5)
            lrs = choose_lrs(args, load_results(results_dir))
            print("chosen LRs:", lrs, flush=True)
            continue
        lr = lrs[method] if lr == "tuned" else lr
        if claim(work, f"{method}-{task}-{seed}-{budget}-{lr:g}-{test}"):
            cell(method, task, seed, budget, lr, test)
    print(write_report(args, load_results(results_dir)))


if __name__ == "__main__":
    main()
