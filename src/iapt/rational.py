"""Learnable rational activation (a "safe" Padé unit), one per layer's prompt generator.

    g(x) = (a0 + a1 x + ... + a6 x^6) / (1 + |b1 x + ... + b5 x^5|)

The absolute value keeps the denominator >= 1, so g never divides by zero. The 12 scalars are shared
across channels and start as a least-squares fit of a familiar activation on [-3, 3]; IAPT then learns
them (bi-level by default, see ``iapt.training``) so each layer can find the nonlinearity it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NUMERATOR_DEGREE = 6
DENOMINATOR_DEGREE = 5
FIT_RANGE = (-3.0, 3.0)

# Least-squares fits on [-3, 3] (6001 points, linearised LS then L-BFGS on the safe form, float64),
# reproducible with ``fit_rational``. Max abs error on [-3, 3]: gelu 7.5e-5, silu 5e-9, tanh 2.7e-6,
# identity 0 (exact), relu / leaky_relu 2e-2 (the kink at 0 is not rational).
RATIONAL_INITS: dict[str, tuple[list[float], list[float]]] = {
    "gelu": (
        [7.5150942e-05, 0.50000094, 0.39799759, 0.17708823, 0.076701052, 0.021872214, 0.0024288519],
        [-2.3997479e-06, 0.35418164, 3.8344181e-06, 0.043739836, 9.7435174e-07],
    ),
    "relu": (
        [0.019583149, 0.5000003, 2.9050562, 6.1691244, 5.6225463, 2.2357319, 0.31804912],
        [2.7917194e-06, 12.338246, -1.2406229e-06, 4.4714654, -3.5161798e-07],
    ),
    "leaky_relu": (
        [0.019387317, 0.50499999, 2.8760057, 6.2308195, 5.5663271, 2.2580926, 0.31486921],
        [5.0315576e-07, 12.338256, -4.6594452e-07, 4.4714708, 2.0729185e-08],
    ),
    "silu": (
        [2.7185896e-09, 0.5, 0.24999997, 0.055425475, 0.0068794476, 0.00048322019, 1.5521937e-05],
        [1.2454825e-10, 0.11085095, 1.3263571e-11, 0.00096644039, 6.8423517e-14],
    ),
    "tanh": (
        [-4.90703e-15, 0.99998642, 6.008168e-11, 0.10727394, 6.1836757e-12, 0.00085308891, -1.6120044e-12],
        [6.0134233e-11, 0.44055649, 2.6540704e-11, 0.014431746, 1.4709145e-12],
    ),
    "identity": ([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]),
}

REFERENCE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Evaluate the safe rational function in float32 (x^6 overflows half precision fast).

    ``numerator`` is ``(..., 7)`` and ``denominator`` ``(..., 5)``; leading dims broadcast against ``x``'s
    leading dims, which lets a batch of requests use a batch of different layers' coefficients.
    """
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(compute)
    a = numerator.to(compute)
    b = denominator.to(compute)
    extra = x.dim() - a.dim() + 1  # broadcast coefficients over x's trailing dims
    a = a.reshape(a.shape[:-1] + (1,) * extra + a.shape[-1:])
    b = b.reshape(b.shape[:-1] + (1,) * extra + b.shape[-1:])
    # Horner's rule: fewer multiplies and better conditioned than summing powers.
    num = a[..., 6]
    for i in range(5, -1, -1):
        num = num * x + a[..., i]
    den = b[..., 4]
    for i in range(3, -1, -1):
        den = den * x + b[..., i]
    den = 1.0 + (den * x).abs()
    return (num / den).to(dtype)


class RationalActivation(nn.Module):
    """A learnable degree-6/5 safe rational activation (12 scalars), initialised to a named function.

    Any float dtype in, same dtype out; computed in float32 and finite for |x| up to 1e5.
    """

    def __init__(self, init: str = "gelu") -> None:
        super().__init__()
        if init not in RATIONAL_INITS:
            raise ValueError(f"unknown activation init {init!r}; choose one of {sorted(RATIONAL_INITS)}")
        self.init = init
        a, b = RATIONAL_INITS[init]
        self.numerator = nn.Parameter(torch.tensor(a, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(b, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator)

    def reset_parameters(self) -> None:
        a, b = RATIONAL_INITS[self.init]
        with torch.no_grad():
            self.numerator.copy_(torch.tensor(a))
            self.denominator.copy_(torch.tensor(b))

    def extra_repr(self) -> str:
        return f"init={self.init!r}, degrees=({NUMERATOR_DEGREE}, {DENOMINATOR_DEGREE})"


def fit_rational(
    fn: Callable[[torch.Tensor], torch.Tensor],
    lo: float = FIT_RANGE[0],
    hi: float = FIT_RANGE[1],
    points: int = 6001,
) -> tuple[list[float], list[float], float]:
    """Fit the safe rational form to ``fn`` on [lo, hi]; returns (numerator, denominator, max abs error).

    A linearised least-squares solve (ignoring the absolute value) gives the start, L-BFGS on the true
    form refines it. This is how ``RATIONAL_INITS`` was made; use it to start from another function.
    """
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    y = fn(x)
    powers_num = torch.stack([x**i for i in range(NUMERATOR_DEGREE + 1)], 1)
    powers_den = torch.stack([x ** (j + 1) for j in range(DENOMINATOR_DEGREE)], 1)
    design = torch.cat([powers_num, -y[:, None] * powers_den], 1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    a = solution[: NUMERATOR_DEGREE + 1].clone().requires_grad_(True)
    b = solution[NUMERATOR_DEGREE + 1 :].clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [a, b],
        max_iter=2000,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((rational(x, a, b) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        err = (rational(x, a, b) - y).abs().max().item()
    return a.detach().tolist(), b.detach().tolist(), err
