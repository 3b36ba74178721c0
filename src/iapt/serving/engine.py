"""One frozen backbone, many tenants' IAPT adapters, continuous batching across tenants.

Why this shape. IAPT's adapter work happens only at prefill: each layer's generator reads the instruction
and writes ``n`` soft tokens into reserved slots; after that the slots' keys and values sit in the KV cache
and decoding is the bare backbone's. So a multi-tenant engine needs two things:

* a prefill that runs *each row's own* generators: the generator weights of every loaded adapter are
  stacked into an :class:`AdapterBank` (one tensor per weight and layer, leading dim = adapter index), a
  batch gathers the rows' adapters by index and calls :func:`iapt.generator.soft_prompts` once per layer
  for the whole batch (once per pooling mode, in practice once), never once per tenant;
* a decode loop that is plain batched decoding over a shared ``DynamicCache``, rows of any tenant mixed.

Rows are left-padded and carry their own attention mask; position ids come from that mask. A prefill row
is laid out ``[padding | its n slots | prompt]``, contiguous exactly as the row alone, so its positions and
even its sliding-window distances are those it would have alone, and its output never depends on its
neighbours. A base-model row has no slots at all: it is the bare backbone.

Continuous batching: new requests are prefilled as their own small batch between decode steps, then their
cache is merged into the running one (left-padded along the sequence dim, concatenated along the batch
dim); finished or cancelled rows are evicted with ``index_select`` and the all-padding columns on the left
are trimmed. See README.md next to this file for why transformers' own continuous batching (paged cache)
is not used.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from iapt.backbone import anchor_states, check_base, find_layers, input_embeddings, slot_token_id, text_config
from iapt.serving.bank import Adapter, AdapterBank, read_adapter
from iapt.serving.loop import EngineLoop
from iapt.serving.requests import (
    FREQUENCY_PENALTY_RANGE,
    MAX_LOGPROBS,
    MIN_TEMPERATURE,
    PRESENCE_PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
    AdapterTooLarge,
    Event,
    QueueFull,
    Request,
    RequestHandle,
    TokenLogprob,
    UnknownAdapter,
    check_context,
    check_request,
)
from iapt.serving.sampling import _generator, _logprob, _penalize
from iapt.slots import SlotPlan, SlotWriter

__all__ = [
    "FREQUENCY_PENALTY_RANGE",
    "MAX_LOGPROBS",
    "MIN_TEMPERATURE",
    "PRESENCE_PENALTY_RANGE",
    "REPETITION_PENALTY_RANGE",
    "SEED_RANGE",
    "Adapter",
    "AdapterBank",
    "AdapterTooLarge",
    "Engine",
    "Event",
    "QueueFull",
    "Request",
    "RequestHandle",
    "TokenLogprob",
    "UnknownAdapter",
    "read_adapter",
]

logger = logging.getLogger(__name__)

StepObserver = Callable[[str, Sequence[Request], float | None], None]
"""(kind: "prefill" | "decode", the step's requests, None before the step / its wall seconds after it)."""


_WEIGHTS = ("down_weight", "down_bias", "queries", "numerator", "denominator", "up_weight", "up_bias")


@dataclass
class _Prefill:
    """The slot writer's session during one engine prefill: the plan, and whose generators each row runs."""

    plan: SlotPlan
    bank: AdapterBank
    index: torch.Tensor  # (B,) adapter index of each row, 0 = none


@dataclass
class _Running:
    """The rows being decoded: their handles, shared cache, attention mask and last tokens."""

    handles: list[RequestHandle]
    cache: DynamicCache
    mask: torch.Tensor  # (B, L) over everything in the cache
    last: torch.Tensor  # (B,) token fed at the next decode step
    generators: list[torch.Generator | None]
    failed: dict[int, str] = field(default_factory=dict)  # row -> why its last token could not be sampled
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # row -> its last token's, if asked for


# ------------------------------------------------------------------------------------------ engine
class Engine(EngineLoop):
    """Serve many IAPT adapters on one frozen backbone with continuous batching across tenants.

    Use it from Python directly::

        engine = Engine(base_model, tokenizer, "adapters/")
        handles = engine.generate_many([Request(ids, adapter="alice"), Request(ids2, adapter=None)])
        handles[0].tokens, handles[0].finish_reason

    or run it in a background thread (``start()``) and ``submit()`` from any thread; that is what the HTTP
    server does. Only the engine's thread touches the model.
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        tokenizer: Any = None,
        adapters_dir: str | Path | None = None,
        *,
        base_name: str | None = None,
        base_aliases: Sequence[str] | None = None,
        max_batch_size: int = 32,
        max_queue: int = 256,
        layers_path: str | None = None,
        max_bottleneck: int = 512,
        max_soft_tokens: int = 64,
    ) -> None:
        """``max_bottleneck`` / ``max_soft_tokens``: the largest r and n an adapter may have. Every adapter in the
        bank is padded to the largest loaded, so one huge adapter would slow and enlarge every tenant's prefill.
        ``base_aliases``: other names ``model`` may give the base by (vLLM's ``--served-model-name`` extras); by
        default the model's ``name_or_path``. Given, the path is not a name: it would tell tenants about the server."""
        check_base(base_model)
        self.model = base_model.eval()
        self.tokenizer = tokenizer
        text = text_config(base_model)
        self.hidden_size, self.num_layers = text.hidden_size, text.num_hidden_layers
        embeddings = input_embeddings(base_model)
        self.vocab_size = embeddings.weight.shape[0]
        self.max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        self.device = embeddings.weight.device
        self.base_name = base_name or getattr(base_model.config, "name_or_path", "") or "base"
        if base_aliases is None:
            base_aliases = [getattr(base_model.config, "name_or_path", "") or self.base_name]
        self.base_names = {self.base_name, *base_aliases}
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_bottleneck, self.max_soft_tokens = max_bottleneck, max_soft_tokens
        self.slot_token_id = slot_token_id(base_model)  # what IAPTModel puts in its slots
        self.pad_token_id = self.slot_token_id
        self.eos_token_ids = _eos_ids(base_model, tokenizer)

        self._adapters: dict[str, Adapter] = {}
        self.bank = AdapterBank([], self.hidden_size, self.num_layers, self.device)
        self.load_errors: dict[str, str] = {}
        self._init_loop(threading.RLock())  # the lock guards the queue, the registry and the bank
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: _Running | None = None
        self._ids = itertools.count(1)
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self._observers: list[StepObserver] = []
        self.tokens_generated = 0
        self.requests_finished = 0

        layers = find_layers(base_model, layers_path)
        self._writer = SlotWriter(dict(enumerate(layers)), self._soft_tokens)
        if adapters_dir is not None:
            self.load_adapters_dir(adapters_dir)

    # -------------------------------------------------------------------- registry
    def load_adapters_dir(self, adapters_dir: str | Path) -> dict[str, str]:
        """Load every adapter subfolder (named after it); a bad one is skipped and reported in ``load_errors``."""
        root = Path(adapters_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"adapters folder {root} does not exist")
        return self.load_adapters(
            {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        )

    def load_adapters(self, paths: Mapping[str, str | Path]) -> dict[str, str]:
        """Load many adapters (name -> folder) at once; bad ones are skipped and reported in ``load_errors``.

        The bank is extended once for all of them: loading N adapters one by one would copy it N times.
        """
        read = []
        for name, path in paths.items():
            try:
                self._check_name(name)
                read.append(self._check_size(read_adapter(self.model, path, name)))
            except (ValueError, FileNotFoundError, OSError) as exc:
                self.load_errors[name] = str(exc)
                logger.warning("skipping adapter %s: %s", path, exc)
        self._add(read)
        return dict(self.load_errors)

    def load_adapter(self, name: str, path: str | Path) -> Adapter:
        """Load an adapter at run time; raises ValueError (wrong base, bad files, name taken) and keeps serving."""
        self._check_name(name)
        adapter = self._check_size(read_adapter(self.model, path, name))  # outside the lock: file I/O
        self._add([adapter])
        return adapter

    def _check_size(self, adapter: Adapter) -> Adapter:
        r, n = adapter.config.bottleneck, adapter.config.num_soft_tokens
        if r > self.max_bottleneck:
            raise AdapterTooLarge(
                f"adapter {adapter.name!r} has bottleneck r={r}; this server's limit is "
                f"max_bottleneck={self.max_bottleneck}"
            )
        if n > self.max_soft_tokens:
            raise AdapterTooLarge(
                f"adapter {adapter.name!r} has {n} soft tokens; this server's limit is "
                f"max_soft_tokens={self.max_soft_tokens}"
            )
        return adapter

    def _check_name(self, name: str) -> None:
        if not name or name in self.base_names:
            raise ValueError(f"adapter name {name!r} is empty or is the base model's name")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")

    def _add(self, adapters: list[Adapter]) -> None:
        """Stack ``adapters`` into a new bank and swap it in. Reading and copying happen outside the lock, so
        requests keep being admitted meanwhile; if another load or unload swapped the bank first, redo."""
        # Anchored adapters' slot states: a forward of the bare base on n tokens, safe beside the engine thread
        # (the engine's hooks act on its own prefills only).
        anchors = {a.name: states for a in adapters if (states := anchor_states(self.model, a.config)) is not None}
        while True:
            with self._lock:
                for adapter in adapters:
                    self._check_name(adapter.name)
                start = self.bank
            bank = start.extended(adapters, anchors)
            with self._lock:
                if self.bank is not start:
                    continue
                for adapter in adapters:
                    self._check_name(adapter.name)  # again: another thread may have loaded the name meanwhile
                self.bank = bank
                for adapter in adapters:
                    self._adapters[adapter.name] = adapter
                    self.load_errors.pop(adapter.name, None)
                return

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter. Its running requests finish (decoding needs no adapter); queued ones fail (404).

        The smaller bank is built outside the lock (a copy of the bank: seconds for a large one), so requests
        keep being admitted meanwhile; if another load or unload swapped the bank first, redo.
        """
        while True:
            with self._lock:
                if name not in self._adapters:
                    raise UnknownAdapter(f"no adapter named {name!r} is loaded")
                start = self.bank
            smaller = start.without(name)
            with self._lock:
                if self.bank is not start:
                    continue
                if name not in self._adapters:
                    raise UnknownAdapter(f"no adapter named {name!r} is loaded")
                del self._adapters[name]
                self.bank = smaller
                return

    @property
    def adapters(self) -> dict[str, Adapter]:
        with self._lock:
            return dict(self._adapters)

    def has_model(self, name: str | None) -> bool:
        return name is None or name in self.base_names or name in self._adapters

    # -------------------------------------------------------------------- submit
    def submit(self, request: Request, *, force: bool = False) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError (bad request), UnknownAdapter, QueueFull."""
        self._validate(request)
        with self._lock:
            if not force and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later", retry_after=1.0)
            handle = RequestHandle(next(self._ids), request)
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def submit_many(self, requests: Sequence[Request]) -> list[RequestHandle]:
        """Queue several requests all or none (one HTTP call with several prompts)."""
        if len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} completions in one call; this server queues at most {self.max_queue}")
        for r in requests:
            self._validate(r)
        with self._lock:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            return [self.submit(r) for r in requests]

    def _validate(self, r: Request) -> None:
        if r.adapter is not None and not self.has_model(r.adapter):
            raise UnknownAdapter(f"no adapter named {r.adapter!r} is loaded")
        check_request(r, self.vocab_size)
        adapter = self._adapters.get(r.adapter or "")
        check_context(r, adapter.config.num_slots if adapter else 0, self.max_positions)

    # -------------------------------------------------------------------- running
    def generate_many(
        self, requests: Sequence[Request | list[int] | str], timeout: float | None = None
    ) -> list[RequestHandle]:
        """Run requests to completion and return their handles (``.tokens``, ``.finish_reason``).

        Strings are tokenized with the engine's tokenizer; bare token lists use the base model. Steps the
        engine in the caller's thread unless the background thread runs. The queue bound does not apply.
        """
        handles = [self.submit(self._as_request(r), force=True) for r in requests]
        if self.is_running:
            for h in handles:
                h.wait(timeout)
        else:
            while not all(h.finished for h in handles):
                self.step()
        return handles

    def _as_request(self, r: Request | list[int] | str) -> Request:
        if isinstance(r, Request):
            return r
        if isinstance(r, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need the engine's tokenizer")
            return Request(self.tokenizer(r).input_ids)
        return Request(list(r))

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._running is not None

    def _cancel_all(self) -> None:
        with self._lock:
            for h in list(self._waiting) + (self._running.handles if self._running else []):
                h._emit(Event(finish_reason="cancelled", error="the server is shutting down"))
            self._waiting.clear()
            self._running = None

    @torch.no_grad()
    def step(self) -> None:
        """One scheduling round: drop cancelled requests, prefill newcomers into free rows, decode one token."""
        with self._lock:
            self._drop_cancelled()
            free = self.max_batch_size - (len(self._running.handles) if self._running else 0)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            bank = self.bank
        if admitted:
            self._admit(admitted, bank)
        if self._running is not None:
            try:
                with self._observed("decode", [h.request for h in self._running.handles]):
                    self._decode()
            except Exception as exc:  # cannot tell which row broke the shared forward: fail the batch
                logger.exception("decode step failed")
                for h in self._running.handles:
                    h._emit(Event(finish_reason="error", error=f"decode failed: {exc}"))
                self._running = None

    def add_step_observer(self, observer: StepObserver) -> Callable[[], None]:
        """Call ``observer(kind, requests, seconds)`` around every model step, in the engine's thread: before it
        with ``seconds=None``, after it with the step's wall time. ``kind`` is "prefill" or "decode", ``requests``
        the step's rows in order. For benchmarks and tracing (time a step with a device sync, see which rows a
        step runs); an observer must be quick and must not raise. Returns a function that removes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer)

    @contextlib.contextmanager
    def _observed(self, kind: str, requests: list[Request]) -> Iterator[None]:
        if not self._observers:
            yield
            return
        for observer in list(self._observers):
            observer(kind, requests, None)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        for observer in list(self._observers):
            observer(kind, requests, seconds)

    def _drop_cancelled(self) -> None:
        for h in [h for h in self._waiting if h._cancel]:
            self._waiting.remove(h)
            h._emit(Event(finish_reason="cancelled"))
        if self._running is not None:
            keep = [i for i, h in enumerate(self._running.handles) if not h._cancel]
            for h in self._running.handles:
                if h._cancel:
                    h._emit(Event(finish_reason="cancelled"))
            self._keep_rows(keep)

    def _admit(self, handles: list[RequestHandle], bank: AdapterBank) -> None:
        """Prefill newcomers as one batch; if that fails, alone, so one bad request fails only itself."""
        ready = []
        for h in handles:
            name = h.request.adapter
            if name is not None and name not in self.base_names and name not in bank.index:
                h._emit(
                    Event(
                        finish_reason="error",
                        error=f"adapter {name!r} was unloaded before the request ran",
                        code="model_not_found",
                    )
                )
            else:
                ready.append(h)
        if not ready:
            return
        try:
            with self._observed("prefill", [h.request for h in ready]):
                batch = self._prefill_batch(ready, bank)
        except Exception:
            if len(ready) == 1:
                logger.exception("prefill of request %d failed", ready[0].id)
                ready[0]._emit(Event(finish_reason="error", error="prefill failed"))
                return
            for h in ready:
                self._admit([h], bank)
            return
        self._merge(batch)

    def _prefill_batch(self, handles: list[RequestHandle], bank: AdapterBank) -> _Running:
        """Prefill newcomers as one left-padded batch, every row laid out exactly as it would be alone.

        Row i is ``[padding | its n_i slots | prompt]``: contiguous, so positions and even sliding-window
        distances are those of the row alone. A base-model row has n_i = 0, which is plain left padding. The
        generators write a row's last ``num_slots`` slots: a sink column (``IAPTConfig.sink_token``) before them
        keeps the slot token's own states.
        """
        index = torch.tensor([bank.index.get(h.request.adapter or "", 0) for h in handles], device=self.device)
        written = bank.num_soft_tokens.index_select(0, index)
        lead = bank.sink.index_select(0, index)
        slots = (written + lead).tolist()
        lengths = [len(h.request.prompt) for h in handles]
        width = max(n + length for n, length in zip(slots, lengths, strict=True))
        ids = torch.full((len(handles), width), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        pool = torch.zeros_like(ids, dtype=torch.bool)  # what the generators read: the prompt tokens
        starts = []
        for i, (h, n, length) in enumerate(zip(handles, slots, lengths, strict=True)):
            ids[i, width - length :] = torch.tensor(h.request.prompt, device=self.device)
            ids[i, width - length - n : width - length] = self.slot_token_id
            mask[i, width - length - n :] = 1
            pool[i, width - length :] = True
            starts.append(width - length - n)
        session: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if max(slots) > 0:
            offsets = torch.arange(int(written.max()), device=self.device)
            first = torch.tensor(starts, device=self.device) + lead
            columns = (first[:, None] + offsets).clamp_max(width - 1)
            valid = offsets < written[:, None]
            session = self._writer.session(_Prefill(SlotPlan(columns, pool, valid), bank, index))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        with session:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        gens = [_generator(h.request) for h in handles]
        running = _Running(handles, cache, mask, ids[:, -1], gens)
        running.last, running.failed, running.logprobs = self._sample(out.logits[:, -1], running)
        return running

    @staticmethod
    def _soft_tokens(layer: int, hidden: torch.Tensor, state: _Prefill) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot writer's source: every row's soft tokens of ``layer``, one bank call for the batch (rows
        without a generator at this layer keep their slots' states)."""
        return state.bank.soft_prompts(layer, state.index, hidden, state.plan.pooled, state.plan.columns.shape[1])

    def _merge(self, new: _Running) -> None:
        """Deliver the prefill's first tokens, then join the unfinished rows to the running batch."""
        keep = self._deliver(new)
        if not keep:
            return
        new = _select(new, keep)
        old = self._running
        if old is None:
            self._running = new
            return
        length = max(old.mask.shape[1], new.mask.shape[1])
        for lo, ln in zip(_kv_layers(old.cache), _kv_layers(new.cache), strict=True):
            lo.keys = torch.cat([_pad_left(_kv(lo.keys), length), _pad_left(_kv(ln.keys), length)])
            lo.values = torch.cat([_pad_left(_kv(lo.values), length), _pad_left(_kv(ln.values), length)])
        old.mask = torch.cat([_pad_left(old.mask, length), _pad_left(new.mask, length)])
        old.last = torch.cat([old.last, new.last])
        old.handles += new.handles
        old.generators += new.generators

    def _decode(self) -> None:
        run = self._running
        assert run is not None, "decode needs running rows"
        run.mask = torch.cat([run.mask, run.mask.new_ones(run.mask.shape[0], 1)], dim=1)
        positions = run.mask.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=run.last[:, None],
            attention_mask=run.mask,
            position_ids=positions,
            past_key_values=run.cache,
            use_cache=True,
        )
        run.last, run.failed, run.logprobs = self._sample(out.logits[:, -1], run)
        self._keep_rows(self._deliver(run))

    def _deliver(self, run: _Running) -> list[int]:
        """Emit each row's new token; return the rows that go on."""
        keep = []
        now = time.monotonic()
        for i, (h, token) in enumerate(zip(run.handles, run.last.tolist(), strict=True)):
            if i in run.failed:  # this row alone: its neighbours' tokens are unaffected
                h._emit(Event(finish_reason="error", error=run.failed[i], code="invalid_output"))
                continue
            h._emit(Event(token=token, logprob=run.logprobs.get(i)))
            r = h.request
            stop = (not r.ignore_eos and token in self.eos_token_ids) or token in r.stop_token_ids
            if stop or len(h.tokens) >= r.max_tokens:
                h._emit(Event(finish_reason="stop" if stop else "length"))
                self.requests_finished += 1
            elif h._cancel:
                h._emit(Event(finish_reason="cancelled"))
            else:
                keep.append(i)
        self.tokens_generated += len(run.handles)
        self._token_times.append((now, len(run.handles)))
        while now - self._token_times[0][0] > 10.0:
            self._token_times.popleft()
        return keep

    def _keep_rows(self, keep: list[int]) -> None:
        run = self._running
        if run is None or len(keep) == len(run.handles):
            return
        self._running = _select(run, keep) if keep else None

    def _sample(
        self, logits: torch.Tensor, run: _Running
    ) -> tuple[torch.Tensor, dict[int, str], dict[int, TokenLogprob]]:
        """Each row's next token with its own parameters: penalties, then greedy below MIN_TEMPERATURE, else
        temperature, top-k and top-p sampling with the request's own generator (vLLM's order).

        Row by row, so one row's numbers cannot fail another, and rows of one batch may differ in every
        parameter: a row whose logits or probabilities are not finite is returned in the second value
        (row -> why) and only its request fails. Rows that asked for logprobs get them in the third value.
        A row with neutral parameters takes exactly the path it took before they existed.
        """
        tokens = logits.argmax(-1)
        failed: dict[int, str] = {}
        logprobs: dict[int, TokenLogprob] = {}
        rows = logits.float()
        bad = rows.isnan().any(-1) | rows.isposinf().any(-1) | rows.isneginf().all(-1)
        for i in bad.nonzero().flatten().tolist():
            failed[i] = "the model's output for this request is not finite (NaN or infinite logits)"
        for i, (h, g) in enumerate(zip(run.handles, run.generators, strict=True)):
            r = h.request
            if i in failed or (g is None and not r.penalized and r.logprobs is None):
                continue
            row = _penalize(rows[i], r, h.tokens) if r.penalized else rows[i]
            if g is None:
                tokens[i] = row.argmax()
            else:
                if 0 < r.top_k < row.shape[0]:  # keep the k largest logits (ties at the k-th kept too)
                    row = row.masked_fill(row < row.topk(r.top_k).values[-1], float("-inf"))
                probs = torch.softmax(row / r.temperature, -1)
                if r.top_p < 1:
                    sorted_p, order = probs.sort(descending=True)
                    sorted_p[(sorted_p.cumsum(0) - sorted_p) >= r.top_p] = 0
                    probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
                if not (torch.isfinite(probs).all() and probs.sum() > 0):
                    failed[i] = f"sampling at temperature {r.temperature} gave no valid probabilities"
                    continue
                tokens[i] = torch.multinomial(probs, 1, generator=g).item()
            if r.logprobs is not None:
                logprobs[i] = _logprob(rows[i], int(tokens[i]), r.logprobs)
        return tokens, failed, logprobs

    # -------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Queue length, batch size, tokens/s over the last 10 s, totals: what /metrics exports."""
        now = time.monotonic()
        times = [(t, n) for t, n in list(self._token_times) if now - t <= 10.0]  # a copy: the engine appends
        window = sum(n for _, n in times)
        span = now - times[0][0] if times else 0.0
        running = self._running
        return {
            "waiting": len(self._waiting),
            "running": len(running.handles) if running else 0,
            "tokens_per_second": window / max(span, 1.0) if window else 0.0,
            "tokens_generated": self.tokens_generated,
            "requests_finished": self.requests_finished,
            "adapters": len(self._adapters),
        }

    def close(self) -> None:
        """Stop the loop and remove the engine's hooks: the backbone is bare again."""
        self.stop()
        self._writer.remove()


# ------------------------------------------------------------------------------------------ helpers
def _kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, each a key/value layer: the engine's own DynamicCache of attention layers."""
    return cast(list[DynamicLayer], list(cache.layers))


def _kv(t: torch.Tensor | None) -> torch.Tensor:
    assert t is not None, "an engine cache layer holds keys and values after its prefill"
    return t


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dim (-2 for K/V ``(B, H, L, D)``, -1 for masks ``(B, L)``) on the left with zeros."""
    dim = -1 if t.dim() == 2 else -2
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _select(run: _Running, keep: list[int]) -> _Running:
    """Keep rows ``keep`` and trim the columns on the left that no remaining row attends to."""
    idx = torch.tensor(keep, device=run.mask.device)
    mask = run.mask.index_select(0, idx)
    start = int(mask.any(0).long().argmax())
    for layer in _kv_layers(run.cache):
        layer.keys = _kv(layer.keys).index_select(0, idx)[..., start:, :]
        layer.values = _kv(layer.values).index_select(0, idx)[..., start:, :]
    return _Running(
        [run.handles[i] for i in keep],
        run.cache,
        mask[:, start:],
        run.last.index_select(0, idx),
        [run.generators[i] for i in keep],
    )


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(e for e in eos if isinstance(e, int))
    return ids
