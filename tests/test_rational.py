from __future__ import annotations

import pytest
import torch

from iapt import RationalActivation
from iapt.rational import RATIONAL_INITS, REFERENCE_FUNCTIONS, fit_rational

GRID = torch.linspace(-3, 3, 2001)


@pytest.mark.parametrize(
    "name, tolerance",
    [("gelu", 2e-3), ("tanh", 2e-3), ("identity", 2e-3), ("silu", 2e-3), ("relu", 3e-2), ("leaky_relu", 3e-2)],
)
def test_initial_fit_is_close_to_the_named_function(name, tolerance):
    act = RationalActivation(init=name)
    err = (act(GRID) - REFERENCE_FUNCTIONS[name](GRID)).abs().max().item()
    assert err < tolerance, f"{name}: max error {err:.2e}"


def test_twelve_learnable_scalars():
    act = RationalActivation()
    assert sum(p.numel() for p in act.parameters() if p.requires_grad) == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_in_equals_dtype_out(dtype):
    x = torch.linspace(-5, 5, 11, dtype=dtype)
    y = RationalActivation("gelu")(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(RATIONAL_INITS))
def test_finite_for_huge_inputs(name):
    x = torch.tensor([-1e5, -1e3, -10.0, 0.0, 10.0, 1e3, 1e5])
    act = RationalActivation(name)
    assert torch.isfinite(act(x)).all()
    assert torch.isfinite(act(x.bfloat16())).all()
    x.requires_grad_(True)
    act(x).sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in act.parameters())


def test_denominator_is_safe_for_any_coefficients():
    act = RationalActivation("gelu")
    with torch.no_grad():
        act.denominator.copy_(torch.tensor([-1.0, 0.5, -2.0, 3.0, -4.0]))
    y = act(torch.linspace(-10, 10, 10001))
    assert torch.isfinite(y).all()


def test_fit_rational_reproduces_the_shipped_gelu_fit():
    a, b, err = fit_rational(REFERENCE_FUNCTIONS["gelu"], points=2001)
    assert err < 2e-4
    from iapt.rational import rational

    shipped = RationalActivation("gelu")(GRID.double())
    refit = rational(GRID.double(), torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert (shipped - refit).abs().max() < 5e-4


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown activation init 'swish2'"):
        RationalActivation("swish2")
