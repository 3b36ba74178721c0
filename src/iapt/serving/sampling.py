"""Per-row sampling pieces, vLLM's order: penalties, then temperature and top-k/top-p; logprobs; seeded generators."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from iapt.serving.requests import MIN_TEMPERATURE, Request, TokenLogprob


def _penalize(logits: torch.Tensor, r: Request, output: Sequence[int]) -> torch.Tensor:
    """One row's logits ``(V,)`` with ``r``'s penalties, as vLLM applies them: the repetition penalty (HF's
    ``RepetitionPenaltyLogitsProcessor``) over prompt and output tokens, frequency and presence penalties
    (OpenAI's) over the output so far. Returns a new tensor; ``logits`` is left as it is."""
    vocab = logits.shape[0]
    out = logits.clone()
    if r.repetition_penalty != 1.0:
        seen = torch.tensor(
            [t for t in itertools.chain(r.prompt, output) if 0 <= t < vocab], dtype=torch.long, device=out.device
        ).unique()
        values = out.gather(0, seen)
        out.scatter_(0, seen, torch.where(values > 0, values / r.repetition_penalty, values * r.repetition_penalty))
    if output and (r.frequency_penalty != 0.0 or r.presence_penalty != 0.0):
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=out.device), minlength=vocab)[
            :vocab
        ].to(out.dtype)
        out -= r.frequency_penalty * counts + r.presence_penalty * (counts > 0).to(out.dtype)
    return out


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under the raw logits ``(V,)`` and the ``top`` most likely tokens'."""
    logp = torch.log_softmax(logits, -1)
    best = logp.topk(top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return TokenLogprob(token, float(logp[token]), pairs)


def _generator(r: Request) -> torch.Generator | None:
    """Each sampled request's own generator; None (greedy) below MIN_TEMPERATURE."""
    if r.temperature < MIN_TEMPERATURE:
        return None
    g = torch.Generator()
    if r.seed is not None:
        g.manual_seed(r.seed)
    else:
        g.seed()
    return g
