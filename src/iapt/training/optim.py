"""Optimisers for the three ways the rational activations learn, and the bi-level step.

Bi-level (first-order DARTS): the rational coefficients Θ are the "architecture", the rest of each
generator Ω the "weights". One step updates Ω on a training batch, then Θ on a dev batch, each with its
own AdamW and learning rate. ``joint`` updates both on the training batch; ``frozen`` never updates Θ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup


@dataclass
class Optimisers:
    weights: torch.optim.Optimizer
    weights_schedule: torch.optim.lr_scheduler.LRScheduler
    rational: torch.optim.Optimizer | None = None
    rational_schedule: torch.optim.lr_scheduler.LRScheduler | None = None

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.state_dict(),
            "weights_schedule": self.weights_schedule.state_dict(),
            "rational": None if self.rational is None else self.rational.state_dict(),
            "rational_schedule": None if self.rational_schedule is None else self.rational_schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["weights"])
        self.weights_schedule.load_state_dict(state["weights_schedule"])
        if self.rational is not None:
            self.rational.load_state_dict(state["rational"])
            if self.rational_schedule is None:
                raise ValueError("Optimisers.rational needs its rational_schedule")
            self.rational_schedule.load_state_dict(state["rational_schedule"])


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Ω, Θ): trainable weights and rational coefficients. Models without rationals have Θ = []."""
    rational_parameters = getattr(model, "rational_parameters", None)
    theta = list(rational_parameters()) if rational_parameters is not None else []
    ids = {id(p) for p in theta}
    omega = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return omega, theta


def build_optimisers(
    model: nn.Module,
    mode: str,
    lr: float,
    rational_lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    rational_every: int = 1,
) -> Optimisers:
    omega, theta = split_parameters(model)
    if mode == "frozen":
        for p in theta:
            p.requires_grad_(False)
        theta = []
    if mode == "joint" and theta:
        # One optimiser, two groups: Θ keeps its own (small) learning rate and no weight decay.
        weights = torch.optim.AdamW(
            [
                {"params": omega, "weight_decay": weight_decay},
                {"params": theta, "lr": rational_lr, "weight_decay": 0.0},
            ],
            lr=lr,
        )
        theta = []
    else:
        weights = torch.optim.AdamW(omega, lr=lr, weight_decay=weight_decay)
    schedule = get_linear_schedule_with_warmup(weights, warmup_steps, total_steps)
    if mode != "bilevel" or not theta:
        return Optimisers(weights, schedule)
    rational = torch.optim.AdamW(theta, lr=rational_lr, weight_decay=0.0)
    # Θ steps every ``rational_every`` optimiser steps: its schedule counts those steps only.
    every = max(1, rational_every)
    rational_schedule = get_linear_schedule_with_warmup(
        rational, math.ceil(warmup_steps / every), max(1, math.ceil(total_steps / every))
    )
    return Optimisers(weights, schedule, rational, rational_schedule)
