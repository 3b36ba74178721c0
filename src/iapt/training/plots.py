"""PNG plots of a run: loss curves, and each layer's learned activation against the function it began as."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from iapt.io import atomic_write


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    dev = [(r["step"], r["dev_loss"]) for r in history if "dev_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_activations(model: Any, path: Path) -> None:
    """One panel per layer: the learned rational g_l (solid) over its initial function (dashed) on [-4, 4]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iapt.rational import REFERENCE_FUNCTIONS

    generators = list(model.generators.items())
    cols = min(6, len(generators))
    rows = math.ceil(len(generators) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.9 * rows), squeeze=False, sharex=True)
    x = torch.linspace(-4, 4, 401)
    for ax, (layer, gen) in zip(axes.flat, generators):
        with torch.no_grad():
            ax.plot(x, REFERENCE_FUNCTIONS[gen.activation.init](x), "--", color="grey", lw=1)
            ax.plot(x, gen.activation(x), lw=1.4)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(generators) :]:
        ax.axis("off")
    fig.suptitle("learned rational activations (dashed: initial function)", fontsize=9)
    _save(fig, path)


def plot_run(out: Path, history: list[dict[str, Any]], model: Any) -> None:
    plot_losses(history, out / "loss.png")
    if hasattr(model, "generators"):
        plot_activations(model, out / "activations.png")
