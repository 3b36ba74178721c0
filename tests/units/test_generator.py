"""generator.py: the stacked (one adapter per row) form equals the shared one, and edge cases of pooling."""

from __future__ import annotations

import torch

from iapt import IAPTConfig
from iapt.generator import PromptGenerator, soft_prompts


def generators(d=16, **cfg):
    torch.manual_seed(0)
    gens = [PromptGenerator(d, IAPTConfig(bottleneck=4, **cfg)) for _ in range(2)]
    for g in gens:
        torch.nn.init.normal_(g.up.weight)
    return gens


def test_per_row_weights_equal_each_rows_own_generator():
    gens = generators()
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    stack = {k: torch.stack([dict(g.named_parameters())[k] for g in gens]) for k in dict(gens[0].named_parameters())}
    out = soft_prompts(
        hidden,
        mask,
        stack["down.weight"],
        stack["down.bias"],
        stack["queries"],
        stack["activation.numerator"],
        stack["activation.denominator"],
        stack["up.weight"],
        stack["up.bias"],
    )
    for i, g in enumerate(gens):
        torch.testing.assert_close(out[i], g(hidden[i : i + 1], mask[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_masked_tokens_never_reach_the_soft_tokens_and_an_empty_row_is_finite():
    for pooling in ("attention", "mean", "last"):
        g = generators(pooling=pooling)[0]
        hidden = torch.randn(1, 6, 16)
        mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
        changed = hidden.clone()
        changed[:, 3:] = 1e4 * torch.randn(1, 3, 16)  # what is masked may hold anything
        torch.testing.assert_close(g(hidden, mask), g(changed, mask))
        empty = g(hidden, torch.zeros_like(mask))
        assert torch.isfinite(empty).all(), pooling
        if pooling != "last":
            assert not torch.allclose(g(hidden, mask)[0, 0], g(hidden, mask)[0, 1]), "each soft token its own"


def test_bf16_inputs_give_float32_soft_tokens_close_to_float32_inputs():
    g = generators()[0]
    hidden = torch.randn(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = g(hidden.bfloat16(), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, g(hidden, mask), atol=0.1, rtol=0.05)


def test_soft_tokens_follow_the_documented_formula():
    """Z = norm(H) W_down + b, A = softmax_T(Z W_sa), S = A^T Z, P = g(S) W_up + b, written out by hand: the
    norm is applied to Z per token (cheaper), which must be the same function as normalising H first."""
    for input_norm in (True, False):
        g = generators(input_norm=input_norm)[0]
        hidden = 50 * torch.randn(2, 5, 16)  # far from unit RMS, so a missing or misplaced norm shows
        mask = torch.ones(2, 5, dtype=torch.bool)
        h = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) if input_norm else hidden
        z = h @ g.down.weight.T + g.down.bias
        a = torch.softmax(z @ g.queries, dim=1)
        s = a.transpose(1, 2) @ z
        p = g.activation(s) @ g.up.weight.T + g.up.bias
        torch.testing.assert_close(g(hidden, mask), p, atol=1e-4, rtol=1e-4)
