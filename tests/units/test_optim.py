"""training/optim.py: which parameters each mode trains, on what schedule, and that its state round-trips."""

from __future__ import annotations

import torch

from iapt import IAPTConfig, get_iapt_model
from iapt.training.optim import build_optimisers, split_parameters
from tests.tiny import make_base


def model():
    return get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=4))


def test_theta_is_the_rational_coefficients_and_omega_the_rest():
    m = model()
    omega, theta = split_parameters(m)
    assert len(theta) == 2 * 2 and all(p.numel() in (7, 5) for p in theta), "numerator + denominator per layer"
    assert {id(p) for p in omega}.isdisjoint({id(p) for p in theta})
    assert sum(p.numel() for p in omega + theta) == m.get_nb_trainable_parameters()[0]


def test_modes_decide_who_steps_and_with_which_lr():
    frozen = build_optimisers(model(), "frozen", 1e-3, 1e-6, 0.0, total_steps=10, warmup_steps=0)
    assert frozen.rational is None
    joint_model = model()
    joint = build_optimisers(joint_model, "joint", 1e-3, 1e-6, 0.01, total_steps=10, warmup_steps=0)
    assert joint.rational is None and [g["lr"] for g in joint.weights.param_groups] == [1e-3, 1e-6]
    assert joint.weights.param_groups[1]["weight_decay"] == 0.0, "Θ takes no weight decay"
    bilevel = build_optimisers(model(), "bilevel", 1e-3, 1e-6, 0.0, total_steps=10, warmup_steps=2, rational_every=5)
    assert bilevel.rational is not None and bilevel.rational.param_groups[0]["lr"] == 0.0, "warm-up starts at 0"


def test_theta_schedule_counts_its_own_steps_and_state_round_trips():
    m = model()
    opt = build_optimisers(m, "bilevel", 1e-3, 1e-6, 0.0, total_steps=20, warmup_steps=0, rational_every=5)
    lrs = []
    for _ in range(4):  # 20 optimiser steps with Θ every 5 = 4 Θ steps: its decay must reach 0 at the 4th
        opt.rational.step()
        opt.rational_schedule.step()
        lrs.append(opt.rational.param_groups[0]["lr"])
    assert lrs[-1] == 0.0 and lrs[0] > lrs[1] > lrs[2] > 0
    state = opt.state_dict()
    again = build_optimisers(m, "bilevel", 1e-3, 1e-6, 0.0, total_steps=20, warmup_steps=0, rational_every=5)
    again.load_state_dict(state)
    assert again.rational_schedule.last_epoch == opt.rational_schedule.last_epoch
    torch.testing.assert_close(torch.tensor(again.rational.param_groups[0]["lr"]), torch.tensor(0.0))
