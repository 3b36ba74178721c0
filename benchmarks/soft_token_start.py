"""What IAPT's soft tokens start from: the loss over the first steps for each start, LR and warm-up.

Each run builds the real trainer for a long schedule (``--schedule-steps``, the quality regime's 250) and takes
only its first ``--steps`` optimiser steps, logging the training loss of every step, then the dev loss. One
JSON file per run under ``--results`` (resumable: finished runs are skipped); ``--report`` writes the table.

    python benchmarks/soft_token_start.py --workers 2 --threads 1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTS = ["none", "pad", "tokens", "endoftext"]
FIXED_IDS = {"endoftext": 0}  # anchor="tokens" on fixed ids: SmolLM2's <|endoftext|>, the document separator


def run_one(args: argparse.Namespace, anchor: str, lr: float, warmup: int, out: Path) -> None:
    import torch

    from iapt.io import atomic_write_text
    from iapt.models import load_model
    from iapt.training import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model, dtype=args.dtype)
    cfg = TrainConfig(
        model=args.model,
        task=args.task,
        out=str(Path(args.work) / out.stem),
        seed=args.seed,
        anchor="tokens" if anchor in FIXED_IDS else anchor,
        lr=lr,
        anchor_token_ids=[FIXED_IDS[anchor]] * 4 if anchor in FIXED_IDS else None,
        bottleneck=args.bottleneck,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.schedule_steps,
        warmup_ratio=warmup / args.schedule_steps,
        max_dev_examples=args.dev_examples,
        rational_every=args.rational_every,
        dtype=args.dtype,
        progress=False,
    )
    trainer = Trainer(cfg, base, tokenizer)
    trainer.model.train()
    losses, started = [], time.perf_counter()
    batches = iter(trainer.loader)
    for _ in range(args.steps):
        losses.append(trainer._optimiser_step([next(batches)]))
        trainer.state.step += 1
    seconds = time.perf_counter() - started
    result = {
        "anchor": anchor,
        "lr": lr,
        "warmup": warmup,
        "task": args.task,
        "seed": args.seed,
        "dtype": args.dtype,
        "bottleneck": args.bottleneck,
        "losses": losses,
        "dev_loss": trainer.dev_loss(),
        "train_seconds": round(seconds, 1),
        "anchor_token_ids": trainer.unwrapped.iapt_config.anchor_token_ids,
    }
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(
        f"{anchor:7s} lr {lr:g} warm-up {warmup:2d}: first {losses[0]:.2f} max {max(losses):.2f} "
        f"last-10 {statistics.mean(losses[-10:]):.2f} dev {result['dev_loss']:.3f} ({seconds:.0f} s)",
        flush=True,
    )


def report(args: argparse.Namespace) -> str:
    rows = [json.loads(f.read_text()) for f in sorted(Path(args.results).glob("*.json"))]
    lines = [
        f"| start | LR | warm-up | step-1 loss | max loss (steps 1-{args.steps}) | mean loss, last 10 steps "
        "| dev loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (STARTS.index(r["anchor"]), r["lr"], r["warmup"])):
        lines.append(
            f"| {r['anchor']} | {r['lr']:g} | {r['warmup']} | {r['losses'][0]:.2f} | {max(r['losses']):.2f} "
            f"| {statistics.mean(r['losses'][-10:]):.3f} | {r['dev_loss']:.3f} |"
        )
    return "\n".join(lines)


def plot(args: argparse.Namespace, path: Path) -> None:
    """Training loss per step: one panel per LR, one colour per start, solid = 1-step warm-up, dashed = longer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(f.read_text()) for f in sorted(Path(args.results).glob("*.json"))]
    lrs = sorted({r["lr"] for r in rows})
    fig, axes = plt.subplots(1, len(lrs), figsize=(4 * len(lrs), 3.2), sharey=True, squeeze=False)
    colours = {"none": "tab:red", "pad": "tab:blue", "tokens": "tab:green", "endoftext": "tab:purple"}
    for ax, lr in zip(axes[0], lrs):
        for r in rows:
            if r["lr"] == lr:
                ax.plot(
                    range(1, len(r["losses"]) + 1),
                    r["losses"],
                    color=colours[r["anchor"]],
                    linestyle="-" if r["warmup"] <= 1 else "--",
                    label=f"{r['anchor']}, warm-up {r['warmup']}",
                )
        ax.set_title(f"LR {lr:g}", fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (batch of 4)")
    axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--starts", nargs="+", default=STARTS, choices=STARTS)
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--warmups", nargs="+", type=int, default=[1, 15], help="warm-up steps of the long schedule")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--schedule-steps", type=int, default=250)
    p.add_argument("--bottleneck", type=int, default=45)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--dev-examples", type=int, default=100)
    p.add_argument("--rational-every", type=int, default=4, help="Θ step every k (the measured runs: 4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default="runs/start")
    p.add_argument("--results", default=str(HERE / "start-results"))
    p.add_argument("--report", action="store_true", help="print the table of the finished runs and exit")
    p.add_argument("--one", nargs=3, metavar=("START", "LR", "WARMUP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.results).mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(args))
        plot(args, Path(args.results).parent / "start.png")
        return
    if args.one:
        anchor, lr, warmup = args.one[0], float(args.one[1]), int(args.one[2])
        run_one(
            args, anchor, lr, warmup, Path(args.results) / f"{args.task}-{anchor}-lr{lr:g}-w{warmup}-s{args.seed}.json"
        )
        return
    todo = [
        (a, lr, w)
        for a in args.starts
        for lr in args.lrs
        for w in args.warmups
        if not (Path(args.results) / f"{args.task}-{a}-lr{lr:g}-w{w}-s{args.seed}.json").exists()
    ]
    # One process per run (a fresh RNG and allocator each), ``--workers`` at a time with ``--threads`` each.
    passthrough = [a for a in sys.argv[1:] if a != "--report"]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while todo or running:
        while todo and len(running) < args.workers:
            a, lr, w = todo.pop(0)
            running.append(
                subprocess.Popen([sys.executable, __file__, *passthrough, "--one", a, str(lr), str(w)], env=env)
            )
        time.sleep(2)
        running = [r for r in running if r.poll() is None]
    print(report(args))
    plot(args, Path(args.results).parent / "start.png")


if __name__ == "__main__":
    main()
