"""The prompt generator of one layer: instruction hidden states in, n soft tokens out.

    Z = norm(H) @ W_down + b_down          (B, T, r)   down-projection, r << d
    A = softmax_T(Z @ W_sa, mask)          (B, T, n)   one learned query per soft token, instruction tokens only
    S = A^T Z                              (B, n, r)   self-attention pooling: n summaries
    P = g(S) @ W_up + b_up                 (B, n, d)   g: this layer's own rational activation

Trainable parameters per layer: 2·d·r + r·n + 12, plus r + d biases when ``bias=True``. ``norm`` is a
parameter-free RMS normalisation (see ``IAPTConfig.input_norm``). The generator keeps float32 weights
and computes in float32 whatever the backbone's dtype: it runs once per request, at prefill.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from iapt.config import IAPTConfig
from iapt.rational import RationalActivation, rational

_RMS_EPS = 1e-6


def generator_parameter_count(hidden_size: int, config: IAPTConfig, out_features: int | None = None) -> int:
    """Trainable parameters of one generator: d·r + r·n + 12 + r·o (+ r + o biases), o = ``out_features``
    (default d: 2·d·r + r·n + 12 (+ r + d), the paper's hidden-state insertion)."""
    d, r, n = hidden_size, config.bottleneck, config.num_soft_tokens
    o = d if out_features is None else out_features
    return d * r + r * n + 12 + r * o + ((r + o) if config.bias else 0)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias for a shared (out,) bias or per-row (B, out) biases."""
    return y if bias is None else y + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias for shared (out, in) weights or per-row (B, out, in) weights."""
    return _add_bias(x @ weight.transpose(-1, -2), bias)


def project(
    hidden: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None, input_norm: bool = True
) -> torch.Tensor:
    """Z = norm(H) @ W_down + b_down (B, T, r), in float32."""
    h = hidden.float()
    z = h @ down_weight.transpose(-1, -2)
    if input_norm:  # norm(H) @ W = (H @ W) scaled per token: the scale goes on (B, T, r), not on (B, T, d)
        rms = torch.linalg.vector_norm(h, dim=-1, keepdim=True) * h.shape[-1] ** -0.5
        z = z * torch.rsqrt(rms.square() + _RMS_EPS)
    return _add_bias(z, down_bias)


def attention_weights(z: torch.Tensor, queries: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A = softmax_T(Z @ W_sa) over the tokens ``keep`` (B, T) marks (B, T, n); an all-masked row gets zeros."""
    scores = z @ queries  # (B, T, n): column k of W_sa is the query of soft token k
    scores = scores.masked_fill(~keep.unsqueeze(-1), torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=1) * keep.unsqueeze(-1)  # the product zeroes all-masked rows


def soft_prompts(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    queries: torch.Tensor,
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor | None,
    pooling: str = "attention",
    input_norm: bool = True,
) -> torch.Tensor:
    """Compute the soft tokens ``(B, n, d)`` of one layer from ``hidden`` ``(B, T, d)`` and ``mask`` ``(B, T)``.

    Weights are either shared (the module's own shapes) or carry a leading batch dim, one adapter per row:
    that is how a multi-tenant batch runs every tenant's generator in one call. Rows whose mask is empty
    pool nothing and get the generator's response to a zero summary.
    """
    z = project(hidden, down_weight, down_bias, input_norm)
    keep = mask.to(device=z.device, dtype=torch.bool)
    if pooling == "attention":
        weights = attention_weights(z, queries, keep)
        summary = weights.transpose(1, 2) @ z  # (B, n, r)
    else:
        if pooling == "mean":
            w = keep.float()
            pooled = (z * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
        elif pooling == "last":
            last = (keep.long() * torch.arange(1, keep.shape[1] + 1, device=keep.device)).argmax(1)
            pooled = z[torch.arange(z.shape[0], device=z.device), last] * keep.any(1, keepdim=True)
        else:
            raise ValueError(f"unknown pooling {pooling!r}")
        summary = pooled.unsqueeze(1) + queries.transpose(-1, -2)  # one learned offset per soft token
    summary = rational(summary, numerator, denominator)
    return _linear(summary, up_weight, up_bias)


class PromptGenerator(nn.Module):
    """Down-projection, self-attention pooling, rational activation, up-projection (one per layer)."""

    # insertion='kv': this prefill's (soft keys/values, slot columns), set and read by IAPTModel's hooks (unset
    # until the first prefill)
    pending: tuple[torch.Tensor, torch.Tensor] | None

    def __init__(self, hidden_size: int, config: IAPTConfig, out_features: int | None = None) -> None:
        super().__init__()
        r, n = config.bottleneck, config.num_soft_tokens
        self.pooling = config.pooling
        self.input_norm = config.input_norm
        self.down = nn.Linear(hidden_size, r, bias=config.bias, dtype=torch.float32)
        self.queries = nn.Parameter(torch.empty(r, n, dtype=torch.float32))
        self.activation = RationalActivation(config.activation_init)
        self.up = nn.Linear(
            r, hidden_size if out_features is None else out_features, bias=config.bias, dtype=torch.float32
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The up-projection starts at zero (as LoRA's B): soft tokens of any random direction wreck a
        # pretrained model, since the layer's own norm rescales them to full size whatever their length
        # (SmolLM2-135M, 16 sentiment examples: loss 2.02 bare, 16.5 with random soft tokens, 2.36 with
        # zero ones). Z keeps the default Linear scale; queries of std 1/sqrt(r) start the pooling close
        # to a mean over the instruction, from which each query learns what to attend to.
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)
        nn.init.normal_(self.queries, std=1.0 / math.sqrt(self.queries.shape[0]))
        self.activation.reset_parameters()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to(dtype)`` / ``.half()`` move the generator but keep it float32 (as PEFT's adapter autocast): its
        tiny weights run once per request, and bf16 rounding of its updates would swamp what it learns."""
        super()._apply(fn, recurse)
        for t in [*self.parameters(), *self.buffers()]:
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return soft_prompts(
            hidden,
            mask,
            self.down.weight,
            self.down.bias,
            self.queries,
            self.activation.numerator,
            self.activation.denominator,
            self.up.weight,
            self.up.bias,
            pooling=self.pooling,
            input_norm=self.input_norm,
        )
