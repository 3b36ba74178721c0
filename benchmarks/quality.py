"""Quality comparison: methods × tasks × seeds at one parameter budget, resumable, written to QUALITY.md.

Every cell is one `iapt.training.train` run followed by a generation-based test score; its result is a JSON
file under --work, so a killed benchmark continues where it stopped and finished cells are never re-run.

    python benchmarks/quality.py --model default --tasks sentiment nli squad e2e --seeds 1 2 3 \
        --methods iapt lora prompt-tuning prefix idpg lpt --steps 200 --work runs/quality
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from iapt.io import atomic_write_text
from iapt.models import load_model
from iapt.training import TrainConfig, Trainer, evaluate_task

PRIMARY = {"sentiment": "accuracy", "nli": "accuracy", "squad": "f1", "e2e": "rougeL"}
DEFAULT_METHODS = ["iapt", "iapt-joint", "iapt-frozen-gelu", "iapt-frozen-relu", "lora", "prompt-tuning",
                   "prefix", "idpg", "lpt"]


def method_settings(method: str) -> dict[str, Any]:
    """Benchmark names → TrainConfig settings (IAPT ablations are IAPT with other activation settings)."""
    if method == "iapt":
        return {"method": "iapt", "activation_mode": "bilevel"}
    if method == "iapt-joint":
        return {"method": "iapt", "activation_mode": "joint"}
    if method.startswith("iapt-frozen-"):
        return {"method": "iapt", "activation_mode": "frozen", "activation_init": method.removeprefix("iapt-frozen-")}
    if method.startswith("iapt-pool-"):
        return {"method": "iapt", "pooling": method.removeprefix("iapt-pool-")}
    return {"method": method}


def run_cell(args: argparse.Namespace, base: Any, tokenizer: Any, method: str, task: str, seed: int,
             budget: int) -> dict[str, Any]:
    cell = Path(args.work) / f"{args.tag}-{method}-{task}-b{budget}-s{seed}"
    result_file = cell / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if cell.exists():
        import shutil

        shutil.rmtree(cell)  # an unfinished cell restarts from scratch: its result was never recorded
    cfg = TrainConfig(model=args.model, task=task, out=str(cell), seed=seed, budget=budget, max_steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                      eval_every=max(1, args.steps // 4), max_train_examples=args.train_examples,
                      max_dev_examples=args.dev_examples, progress=False, **method_settings(method))
    started = time.perf_counter()
    trainer = Trainer(cfg, base, tokenizer)
    summary = trainer.run()
    from iapt.adapters import load_adapter

    bare = trainer.unwrapped.unload() if hasattr(trainer.unwrapped, "unload") else trainer.unwrapped.base_model
    model = load_adapter(bare, cell / "adapter")
    report = evaluate_task(model, tokenizer, task, "test", args.test_examples, 16, args.max_length, progress=False)
    if hasattr(model, "unload"):
        model.unload()
    result = {"method": method, "task": task, "seed": seed, "budget": budget, "params": summary["trainable_params"],
              "steps": summary["steps"], "metrics": report["metrics"], "score": report["metrics"][PRIMARY[task]],
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    print(f"{method:18s} {task:10s} seed {seed}: {result['score']:.1f} ({result['params']:,d} params, "
          f"{result['seconds']:.0f} s)", flush=True)
    return result


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], wall: float) -> str:
    lines = [f"## {args.model} — budget {args.budget:,d} trainable parameters", "",
             f"Median over seeds {args.seeds} of the test score (sentiment/nli: accuracy, squad: F1, e2e: ROUGE-L; "
             f"percent). {args.steps} steps of {args.batch_size}, LR {args.lr}, max length {args.max_length}, "
             f"{args.train_examples or 'all'} training examples, {args.test_examples or 'all'} test examples. "
             f"Wall time {wall / 60:.0f} min on {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads.", ""]
    tasks = args.tasks
    lines.append("| method | params | " + " | ".join(tasks) + " | mean |")
    lines.append("|---|---:|" + "---:|" * (len(tasks) + 1))
    for method in args.methods:
        mine = [r for r in results if r["method"] == method and r["budget"] == args.budget]
        if not mine:
            continue
        scores = []
        cells = []
        for task in tasks:
            vals = [r["score"] for r in mine if r["task"] == task]
            if vals:
                med = statistics.median(vals)
                scores.append(med)
                cells.append(f"{med:.1f}")
            else:
                cells.append("—")
        mean = f"{statistics.mean(scores):.1f}" if len(scores) == len(tasks) else "—"
        lines.append(f"| {method} | {mine[0]['params']:,d} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def plot_budgets(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in ("iapt", "lora"):
        points: dict[int, list[float]] = {}
        for r in results:
            if r["method"] == method:
                points.setdefault(r["params"], []).append(r["score"])
        if points:
            xs = sorted(points)
            ax.plot(xs, [statistics.mean(points[x]) for x in xs], "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("score (mean over tasks and seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", nargs="+", default=["sentiment", "nli", "squad", "e2e"])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--budget", type=int, default=1_128_360, help="trainable parameters (IAPT r=32 on SmolLM2-135M)")
    p.add_argument("--sweep-budgets", nargs="*", type=int, default=[],
                   help="extra budgets for the IAPT-vs-LoRA plot (first task, first seed)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--dev-examples", type=int, default=64)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/quality")
    p.add_argument("--tag", default="q")
    p.add_argument("--report", default="benchmarks/QUALITY.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                base, tokenizer = load_model(args.model)  # a fresh, untouched backbone per cell
                results.append(run_cell(args, base, tokenizer, method, task, seed, args.budget))
    for budget in args.sweep_budgets:
        for method in ("iapt", "lora"):
            base, tokenizer = load_model(args.model)
            results.append(run_cell(args, base, tokenizer, method, args.tasks[0], args.seeds[0], budget))
    report = write_report(args, results, time.perf_counter() - started)
    if args.sweep_budgets:
        plot_budgets(results, Path(args.report).with_suffix(".png"))
    print(report)
    atomic_write_text(Path(args.work) / "table.md", report)


if __name__ == "__main__":
    main()
