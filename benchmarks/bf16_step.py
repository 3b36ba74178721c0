"""Training-step time with the backbone in bfloat16 against float32, for IAPT and LoRA, in one run.

One optimiser step = what ``iapt train`` does per step: forward and backward of a batch of real training
examples (labels on the responses), gradient clipping, AdamW, and for IAPT the bi-level Θ step on a dev batch
every ``--rational-every`` steps (its cost is spread over the steps). The four models (IAPT / LoRA × fp32 / bf16,
same budget) are stepped in rounds, their order rotated each round, on one process with ``--threads`` threads;
the table prints the median step time of each and the ratios bf16 / fp32 measured in the same rounds.
A Θ-schedule comparison (``--rational-every`` values) runs the same way for IAPT alone.

    python benchmarks/bf16_step.py --threads 1 --rounds 6
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

from iapt.models import load_model
from iapt.training import TrainConfig, Trainer


def make_trainer(args: argparse.Namespace, method: str, dtype: str, rational_every: int = 1) -> Trainer:
    base, tokenizer = load_model(args.model, dtype=dtype)
    cfg = TrainConfig(
        model=args.model,
        task=args.task,
        method=method,
        budget=args.budget,
        out="runs/bf16-step",
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=1000,
        max_train_examples=args.batch_size * (args.rounds + 2) * 4,
        max_dev_examples=32,
        rational_every=rational_every,
        dtype=dtype,
        progress=False,
    )
    trainer = Trainer(cfg, base, tokenizer)
    trainer.model.train()
    return trainer


def step_seconds(trainer: Trainer, batches: Any, steps: int) -> float:
    """Seconds per optimiser step, over ``steps`` consecutive steps (so a Θ step every k is averaged in)."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer._optimiser_step([next(batches)])
        trainer.state.step += 1
    return (time.perf_counter() - start) / steps


def measure(args: argparse.Namespace, named: dict[str, Trainer]) -> dict[str, float]:
    iters = {name: iter(t.loader) for name, t in named.items()}
    for name, t in named.items():  # warm-up: first-call allocations and kernel selection
        step_seconds(t, iters[name], 1)
    samples: dict[str, list[float]] = {name: [] for name in named}
    names = list(named)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(step_seconds(named[name], iters[name], args.steps_per_sample))
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--budget", type=int, default=1_579_590, help="IAPT r=45 on SmolLM2-135M; LoRA sized to match")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--steps-per-sample", type=int, default=4, help="steps per timing sample (a Θ step every 4 is averaged in)"
    )
    p.add_argument(
        "--rational-every",
        nargs="+",
        type=int,
        default=[1, 4],
        help="Θ schedules compared for IAPT (bf16); the dtype comparison uses the first",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    dtype_runs = {
        f"{m} {d}": make_trainer(args, m, d, args.rational_every[-1])
        for m in ("iapt", "lora")
        for d in ("float32", "bfloat16")
    }
    times = measure(args, dtype_runs)
    del dtype_runs
    theta_runs = {f"iapt bf16, Θ every {k}": make_trainer(args, "iapt", "bfloat16", k) for k in args.rational_every}
    theta_runs["iapt bf16, joint (no Θ step)"] = make_trainer(args, "iapt", "bfloat16")
    theta_runs["iapt bf16, joint (no Θ step)"].optim.rational = None
    theta = measure(args, theta_runs)

    print(
        f"\n{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size} x "
        f"<= {args.max_length} tokens of {args.task}, budget {args.budget:,d}, median of {args.rounds} rounds "
        f"of {args.steps_per_sample} steps\n"
    )
    print("| method | fp32 s/step | bf16 s/step | bf16 / fp32 |\n|---|---:|---:|---:|")
    for m in ("iapt", "lora"):
        a, b = times[f"{m} float32"], times[f"{m} bfloat16"]
        print(f"| {m} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    joint = theta["iapt bf16, joint (no Θ step)"]
    print("\n| IAPT, bf16 backbone | s/step | / joint step |\n|---|---:|---:|")
    for name, v in theta.items():
        print(f"| {name} | {v:.3f} | {v / joint:.2f} |")


if __name__ == "__main__":
    main()
