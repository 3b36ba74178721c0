"""What the engine takes and gives: requests, their handles and events, and the errors callers can meet."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Temperatures below this are greedy: dividing logits by ~1e-37 overflows float32 to inf and NaN.
MIN_TEMPERATURE = 1e-2
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Penalty ranges that keep every logit finite in float32 (a penalty of 1e-30 would divide logits into inf).
REPETITION_PENALTY_RANGE = (0.01, 10.0)
FREQUENCY_PENALTY_RANGE = PRESENCE_PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI's chat API (and vLLM's default --max-logprobs)


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_queue``: retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownAdapter(KeyError):
    """No adapter of that name is loaded (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


class AdapterTooLarge(ValueError):
    """The adapter's bottleneck or slot count is above the engine's limit (HTTP 400)."""


@dataclass
class Request:
    """What to generate. ``adapter=None`` (or the base model's name) runs the bare backbone."""

    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    on_event: Callable[[Event], None] | None = None  # called from the engine thread; must not block
    top_k: int = 0  # 0 or -1: off (vLLM's -1); k: sample among the k most likely tokens
    repetition_penalty: float = 1.0  # HF / vLLM: prompt and output tokens' logits / p (> 0) or * p (< 0)
    frequency_penalty: float = 0.0  # OpenAI: logit -= f * count of the token in the output so far
    presence_penalty: float = 0.0  # OpenAI: logit -= p if the token is in the output so far
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the k most likely ones

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes this request's logits (neutral requests skip that work)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties, temperature, top-k/top-p:
    vLLM's default ``raw_logprobs``), and the ``Request.logprobs`` most likely tokens', most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """A new token, or the end of a request (``finish_reason`` set: stop, length, cancelled or error).

    ``code`` says why an error happened when the caller can act on it: ``"model_not_found"`` (the adapter was
    unloaded while the request waited) or ``"invalid_output"`` (this row's numbers were not finite).
    """

    token: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    code: str | None = None
    logprob: TokenLogprob | None = None  # with ``token``, when the request asked for logprobs


@dataclass
class RequestHandle:
    """The caller's side of a submitted request: its tokens so far, events, cancel()."""

    id: int
    request: Request
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, if the request asked for them
    finish_reason: str | None = None
    error: str | None = None
    code: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: bool = False

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; its batch slot is freed before the next decode step."""
        self._cancel = True

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over this request's events, ending with the final one."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def wait(self, timeout: float | None = None) -> RequestHandle:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self

    def _emit(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
        else:
            self.finish_reason, self.error, self.code = event.finish_reason, event.error, event.code
        self._events.put(event)
        if event.finish_reason is not None:
            self._done.set()
        if self.request.on_event is not None:
            try:
                self.request.on_event(event)
            except Exception:  # a broken listener must not take the engine down
                logger.exception("on_event callback of request %d failed", self.id)


def check_request(r: Request, vocab_size: int) -> None:
    """What every engine refuses before a request reaches the model (a ValueError naming the field; HTTP 400)."""
    if not r.prompt:
        raise ValueError("the prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in r.prompt):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if r.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not (math.isfinite(r.temperature) and r.temperature >= 0) or not 0 < r.top_p <= 1:
        raise ValueError("temperature must be a number >= 0 and top_p in (0, 1]")
    if r.seed is not None and (not isinstance(r.seed, int) or not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]):
        raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    if not isinstance(r.top_k, int) or r.top_k < -1:
        raise ValueError("top_k must be an integer >= 1, or 0 / -1 for no top-k")
    for name, (low, high) in (
        ("repetition_penalty", REPETITION_PENALTY_RANGE),
        ("frequency_penalty", FREQUENCY_PENALTY_RANGE),
        ("presence_penalty", PRESENCE_PENALTY_RANGE),
    ):
        value = getattr(r, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if r.logprobs is not None and (not isinstance(r.logprobs, int) or not 0 <= r.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (top logprobs per token)")


def check_context(r: Request, num_slots: int, max_positions: int | None) -> None:
    """Prompt, completion and the adapter's slots must fit the model's positions."""
    total = len(r.prompt) + r.max_tokens + num_slots
    if max_positions and total > max_positions:
        raise ValueError(
            f"prompt ({len(r.prompt)} tokens) + max_tokens ({r.max_tokens}) exceeds the model's "
            f"context of {max_positions} positions"
            + (f" less the adapter's {num_slots} slots" if num_slots else "")
            + "; shorten the prompt or lower max_tokens"
        )
