"""The project's OpenAI server in front of vLLM's engine: ``VLLMEngine`` speaks the built-in engine's interface.

``create_app(VLLMEngine(...), keys)`` serves the same API as with :class:`iapt.serving.engine.Engine` (keys,
tenancy, limits, errors, streaming, stop strings by the app's detokenizer), and vLLM does the batching,
paging and sampling. One background thread owns a ``vllm.LLMEngine``: it adds the submitted requests
(each prompt encoded by :class:`IAPTServing`, the adapter's header in front), aborts the cancelled ones,
steps the engine and turns its outputs into the project's :class:`Event` on each :class:`RequestHandle`.

LoRA tenants are served by vLLM's own multi-LoRA in the same engine (a ``LoRARequest`` per request). Adapters
load and unload at run time between two engine steps (IAPT: the bank in vLLM's worker, through
``collective_rpc`` and :mod:`iapt.vllm.worker`; LoRA: vLLM's ``add_lora`` / ``remove_lora``).

What differs from the built-in engine: unloading an adapter with requests queued or running answers 409 (the
built-in engine lets them finish); a base prompt may not begin with the IAPT marker id (400, see
docs/VLLM.md); seeded sampling draws other numbers than the built-in sampler.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from iapt.config import IAPTConfig
from iapt.serving.loop import EngineLoop
from iapt.serving.protocol import APIError
from iapt.serving.requests import (
    MIN_TEMPERATURE,
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
from iapt.vllm.lora import LoRAInfo, lora_rank_limit, read_lora
from iapt.vllm.protocol import MIN_SLOTS
from iapt.vllm.serving import IAPTServing

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_LORAS_PER_BATCH = 8  # vLLM's max_loras default cap here: each slot holds rank x width weights per module
VLLM_DEFAULT_LORA_RANK = 16  # LoRAConfig.max_lora_rank's default


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter the engine serves: its name, folder and config (what the app reads of it: ``num_soft_tokens``).

    ``kind`` is "IAPT" (the plugin's bank, a header in front of the prompt) or "LORA" (vLLM's own multi-LoRA,
    a ``LoRARequest`` with vLLM id ``lora_id``)."""

    name: str
    path: Path
    config: IAPTConfig | LoRAInfo
    kind: str = "IAPT"
    lora_id: int = 0

    def lora_request(self) -> Any:
        """vLLM's ``LoRARequest`` for this LoRA tenant (the same id every time: vLLM caches adapters by id)."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.lora_id, str(self.path))


class VLLMEngine(EngineLoop):
    """IAPT adapters on vLLM's engine, behind the built-in engine's interface (the part the HTTP app uses).

    ``model``: a local Hugging Face folder (Llama, Mistral, Qwen2 or Gemma 3 text). ``adapters_dir``: every
    subfolder is an adapter served under its name (a bad one is skipped and reported in ``load_errors``);
    ``adapters``: more, name -> folder (a bad one raises). IAPT folders go to the plugin's bank; PEFT LoRA folders
    to vLLM's own multi-LoRA in the same engine (``enable_lora`` is set only when there is one, or when
    ``engine_kwargs`` asks for it, e.g. to load LoRA adapters at run time). ``engine_kwargs`` go to
    ``vllm.EngineArgs`` through :meth:`IAPTServing.engine_args` (which refuses what IAPT cannot serve).
    """

    thread_name = "iapt-vllm-engine"
    idle_wait = 0.05
    stop_timeout = 30.0

    def __init__(
        self,
        model: str | Path,
        adapters_dir: str | Path | None = None,
        *,
        adapters: Mapping[str, str | Path] | None = None,
        tokenizer: Any = None,
        base_name: str | None = None,
        base_aliases: Sequence[str] | None = None,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_bottleneck: int = 512,
        max_soft_tokens: int = 64,
        dtype: str = "float32",
        max_model_len: int | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.model_path = str(model)
        self.base_name = base_name or self.model_path
        self.base_names = {self.base_name, *(base_aliases if base_aliases is not None else [self.model_path])}
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_bottleneck, self.max_soft_tokens = max_bottleneck, max_soft_tokens
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.model_path)
        self.load_errors: dict[str, str] = {}
        self._lora_ids = itertools.count(1)
        self._adapters = self._read_adapters(adapters_dir, adapters or {})
        iapt = {name: a.path for name, a in self._adapters.items() if a.kind == "IAPT"}
        self.serving = IAPTServing(self.model_path, iapt)

        kwargs = dict(engine_kwargs or {})
        kwargs.setdefault("max_num_seqs", max_batch_size)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self._lora_args(kwargs)
        self.llm = _make_engine(self.serving.engine_args(dtype=dtype, **kwargs))
        try:
            self._register_loras(explicit=set(adapters or {}))
        except BaseException:
            self.close_engine()
            raise
        self.max_positions: int = int(self.llm.model_config.max_model_len)
        self.vocab_size: int = int(self.serving.header.vocab_size)
        self._init_state()

    def _lora_args(self, kwargs: dict[str, Any]) -> None:
        """vLLM's LoRA settings, only when a LoRA tenant exists (or the caller enables LoRA, for run-time loads):
        max_lora_rank the smallest value vLLM accepts above every tenant's rank (16 without one), max_loras (per
        batch) one per tenant up to MAX_LORAS_PER_BATCH, max_cpu_loras every tenant (none is evicted and re-read
        from disk). The caller's own values win."""
        loras = [a for a in self._adapters.values() if isinstance(a.config, LoRAInfo)]
        self.lora_enabled = bool(loras or kwargs.get("enable_lora"))
        self.max_lora_rank = 0
        if not self.lora_enabled:
            return
        ranks = [a.config.rank for a in loras if isinstance(a.config, LoRAInfo)]
        kwargs["enable_lora"] = True
        # No tenant yet (LoRA on for run-time loads): vLLM's default rank, and room for several per batch.
        kwargs.setdefault("max_lora_rank", lora_rank_limit(max(ranks)) if ranks else VLLM_DEFAULT_LORA_RANK)
        if ranks and max(ranks) > int(kwargs["max_lora_rank"]):
            raise ValueError(f"max_lora_rank={kwargs['max_lora_rank']} is below a LoRA tenant's rank {max(ranks)}")
        wanted = len(loras) or MAX_LORAS_PER_BATCH
        kwargs.setdefault("max_loras", max(1, min(wanted, MAX_LORAS_PER_BATCH, self.max_batch_size)))
        kwargs.setdefault("max_cpu_loras", max(len(loras), int(kwargs["max_loras"])))
        self.max_lora_rank = int(kwargs["max_lora_rank"])

    def _register_loras(self, explicit: set[str]) -> None:
        """Load every LoRA tenant into vLLM now (``add_lora``), so vLLM's own checks run at start, not on a
        tenant's first request: a refused subfolder of ``adapters_dir`` goes to ``load_errors``, a refused
        explicit adapter raises ValueError."""
        for name, adapter in list(self._adapters.items()):
            if adapter.kind != "LORA":
                continue
            try:
                self._add_lora(adapter)
            except ValueError as exc:
                if name in explicit:
                    raise
                del self._adapters[name]
                self.load_errors[name] = str(exc)
                logger.warning("skipping adapter %s: %s", adapter.path, exc)

    def _add_lora(self, adapter: ServedAdapter) -> None:
        try:
            ok = self.llm.add_lora(adapter.lora_request())
        except Exception as exc:  # vLLM's error, from its engine core: name the adapter, no stack trace
            raise ValueError(f"vLLM refused LoRA adapter {adapter.name!r} ({adapter.path}): {exc}") from None
        if ok is False:
            raise ValueError(f"vLLM refused LoRA adapter {adapter.name!r} ({adapter.path})")

    def close_engine(self) -> None:
        """Shut vLLM's engine core down (its own process by default: it must not outlive the server)."""
        shutdown = getattr(getattr(getattr(self, "llm", None), "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _init_state(self) -> None:
        self.dead: str | None = None  # why vLLM's engine died (EngineDeadError), if it did
        self._init_loop(threading.Lock())
        self._pending: list[tuple[RequestHandle, dict[str, Any], Any, Any]] = []  # handle, prompt, params, LoRA
        self._live: dict[str, RequestHandle] = {}  # vLLM request id -> handle, owned by the engine thread
        self._control: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []  # run-time loads
        self._ids = itertools.count(1)
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens_generated = 0
        self.requests_finished = 0

    # -------------------------------------------------------------------- adapters
    def _read_adapters(
        self, adapters_dir: str | Path | None, explicit: Mapping[str, str | Path]
    ) -> dict[str, ServedAdapter]:
        """Validate every adapter against the base before vLLM starts: the same checks as the built-in engine
        (``read_adapter``: architecture, sizes, weight names and shapes) on a weightless copy of the base; LoRA
        folders with :func:`read_lora` (what vLLM's LoRA serves, shapes against the base)."""
        out: dict[str, ServedAdapter] = {}
        if adapters_dir is not None:
            root = Path(adapters_dir)
            if not root.is_dir():
                raise FileNotFoundError(f"adapters folder {root} does not exist")
            for p in sorted(root.iterdir()):
                if not p.is_dir() or p.name.startswith("."):
                    continue
                try:
                    out[p.name] = self._read(p.name, p)
                except (ValueError, FileNotFoundError, OSError) as exc:
                    self.load_errors[p.name] = str(exc)
                    logger.warning("skipping adapter %s: %s", p, exc)
        for name, path in explicit.items():
            if name in out:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            out[name] = self._read(name, path)
        return out

    def _meta_base(self) -> Any:
        """The base without weights (on ``meta``): enough to check adapters' sizes, kept for run-time loads."""
        if getattr(self, "_meta", None) is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                self._meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model_path))
        return self._meta

    def _read(self, name: str, path: str | Path) -> ServedAdapter:
        """One adapter folder, validated (ValueError / FileNotFoundError naming the problem)."""
        from iapt.adapters import adapter_type
        from iapt.serving.bank import read_adapter

        if not name or name in self.base_names:
            raise ValueError(f"adapter name {name!r} is empty or is the base model's name")
        base = self._meta_base()
        kind = adapter_type(path)
        if kind == "LORA":
            directory, info = read_lora(base, path, name)
            return ServedAdapter(name, directory, info, "LORA", next(self._lora_ids))
        if kind != "IAPT":
            raise ValueError(f"adapter {name!r} is a {kind} adapter; --engine vllm serves IAPT and LoRA adapters")
        adapter = read_adapter(base, path, name)
        r, n = adapter.config.bottleneck, adapter.config.num_soft_tokens
        if r > self.max_bottleneck:
            raise AdapterTooLarge(f"adapter {name!r} has bottleneck r={r}; the limit is {self.max_bottleneck}")
        if n > self.max_soft_tokens:
            raise AdapterTooLarge(f"adapter {name!r} has {n} soft tokens; the limit is {self.max_soft_tokens}")
        if n < MIN_SLOTS:
            raise ValueError(
                f"adapter {name!r} has {n} soft tokens; --engine vllm serves adapters with at least {MIN_SLOTS}"
            )
        return ServedAdapter(name, adapter.path, adapter.config)

    @property
    def adapters(self) -> dict[str, ServedAdapter]:
        return dict(self._adapters)

    def has_model(self, name: str | None) -> bool:
        return name is None or name in self.base_names or name in self._adapters

    def load_adapter(self, name: str, path: str | Path) -> ServedAdapter:
        """Serve another adapter from now on (IAPT or LoRA). Raises ValueError naming the problem (the app: 400);
        the engine keeps serving the others.

        The folder is checked here first (as at start); then, in the engine's thread between two steps, an IAPT
        adapter is added to the bank in vLLM's worker (``collective_rpc("iapt_add_adapter")``) and a LoRA one
        given to vLLM (``add_lora``); only then do requests for it get in."""
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        adapter = self._read(name, path)  # file I/O outside the lock
        if isinstance(adapter.config, LoRAInfo):
            if not self.lora_enabled:
                raise ValueError(
                    "this engine was started without LoRA: start it with a LoRA adapter, or with "
                    "engine_kwargs={'enable_lora': True, 'max_lora_rank': ...}, to load LoRA adapters at run time"
                )
            if adapter.config.rank > self.max_lora_rank:
                raise ValueError(
                    f"LoRA adapter {name!r} has rank {adapter.config.rank}; this engine was started with "
                    f"max_lora_rank={self.max_lora_rank}: restart it with max_lora_rank >= {adapter.config.rank}"
                )
        return self._in_loop(lambda: self._load(adapter))

    def _load(self, adapter: ServedAdapter) -> ServedAdapter:
        with self._lock:
            if adapter.name in self._adapters:
                raise ValueError(f"an adapter named {adapter.name!r} is already loaded; unload it first")
        if adapter.kind == "LORA":
            self._add_lora(adapter)
            with self._lock:
                self._adapters[adapter.name] = adapter
            return adapter
        index = self.serving.header.free_index()
        self.serving.header.with_slots(index, adapter.config.num_slots)  # ValueError: no index left
        try:
            self.llm.collective_rpc("iapt_add_adapter", args=(adapter.name, str(adapter.path), index))
        except Exception as exc:  # vLLM's worker refused it: name the adapter, no stack trace
            raise ValueError(f"adapter {adapter.name!r} not loaded by vLLM's worker: {exc}") from None
        with self._lock:
            self.serving.add(adapter.name, adapter.path, index)
            self._adapters[adapter.name] = adapter
        logger.info("adapter %s loaded at run time (%s)", adapter.name, adapter.kind)
        return adapter

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``. Raises UnknownAdapter (404); APIError 409 while requests of it are queued or
        running: a LoRA adapter is applied at every decoded token, and an IAPT request that vLLM preempts is
        recomputed from its header, so either needs its adapter until it ends. Retry once they have finished."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
        self._in_loop(lambda: self._unload(name))

    def _unload(self, name: str) -> None:
        with self._lock:  # the engine's thread: no request is added to vLLM meanwhile
            adapter = self._adapters.get(name)
            if adapter is None:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded")
            handles = [p[0] for p in self._pending] + list(self._live.values())
            busy = sum(1 for h in handles if h.request.adapter == name)
            if busy:
                raise APIError(
                    409,
                    f"adapter {name!r} has {busy} request(s) queued or running; unload it once they have finished",
                    "conflict_error",
                )
            del self._adapters[name]  # new requests can no longer name it (they are encoded under this lock)
        try:
            if adapter.kind == "LORA":
                self.llm.remove_lora(adapter.lora_id)
            else:
                self.llm.collective_rpc("iapt_remove_adapter", args=(name,))
        except Exception:  # no longer served either way; its header index stays taken (the worker still has it)
            logger.exception("vLLM could not drop adapter %s; it is no longer served", name)
            return
        if adapter.kind == "IAPT":
            with self._lock:
                self.serving.remove(name)  # its index is free for the next load
        logger.info("adapter %s unloaded at run time", name)

    def _in_loop(self, call: Callable[[], _T]) -> _T:
        """Run ``call`` in the engine's thread between two steps (vLLM's engine is not thread-safe), or here when
        no loop runs; its exception is raised here."""
        if not self.is_running or threading.current_thread() is self._thread:
            return call()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._wake:
            self._control.append((call, done))
            self._wake.notify()
        return done.result(timeout=600)

    def _run_control(self) -> None:
        with self._lock:
            control, self._control = self._control, []
        for call, done in control:
            try:
                done.set_result(call())
            except BaseException as exc:
                done.set_exception(exc)

    # -------------------------------------------------------------------- submit
    def submit(self, request: Request) -> RequestHandle:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[RequestHandle]:
        """Queue several requests all or none. Raises ValueError (bad request), UnknownAdapter, QueueFull."""
        if len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} completions in one call; this server queues at most {self.max_queue}")
        with self._lock:  # prepared under the lock: a run-time unload must not free an index being encoded
            prepared = [self._prepare(r) for r in requests]
            if self.dead is not None:  # checked under the lock: the engine thread drains the queue under it
                raise APIError(503, f"the vLLM engine has stopped ({self.dead}); restart the server", "server_error")
            if self._waiting() + len(requests) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later", retry_after=1.0)
            handles = [RequestHandle(next(self._ids), r) for r in requests]
            self._pending += [(h, *p) for h, p in zip(handles, prepared, strict=True)]
            self._wake.notify()
        return handles

    def _prepare(self, r: Request) -> tuple[dict[str, Any], Any, Any]:
        """Check ``r`` as the built-in engine does; return its vLLM prompt, sampling parameters and LoRA request
        (None but for a LoRA tenant, whose prompt is the base's: no header)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not self.has_model(r.adapter):
            raise UnknownAdapter(f"no adapter named {r.adapter!r} is loaded")
        check_request(r, self.vocab_size)
        adapter = None if r.adapter in self.base_names else r.adapter
        lora = self._adapters[adapter] if adapter is not None and self._adapters[adapter].kind == "LORA" else None
        iapt = None if lora is not None else adapter
        check_context(r, self.serving.num_slots(iapt), self.max_positions)
        prompt = self.serving.prompt(r.prompt, iapt)  # ValueError: a base prompt beginning with the marker
        greedy = r.temperature < MIN_TEMPERATURE
        params = SamplingParams(
            max_tokens=r.max_tokens,
            temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=r.top_k if r.top_k > 0 and not greedy else 0,
            seed=None if greedy or r.seed is None else _seed(r.seed),
            stop_token_ids=list(r.stop_token_ids) or None,
            ignore_eos=r.ignore_eos,
            repetition_penalty=r.repetition_penalty,
            frequency_penalty=r.frequency_penalty,
            presence_penalty=r.presence_penalty,
            logprobs=r.logprobs,
            detokenize=False,  # the app detokenizes (stop strings included)
            output_kind=RequestOutputKind.DELTA,
        )
        return prompt, params, None if lora is None else lora.lora_request()

    def _waiting(self) -> int:
        """Requests not yet given a token: still pending here, or waiting in vLLM's scheduler."""
        return len(self._pending) + sum(1 for h in list(self._live.values()) if not h.tokens)

    # -------------------------------------------------------------------- running
    def _has_work(self) -> bool:
        return bool(self._pending or self._live)

    def _between_steps(self) -> None:
        self._run_control()

    def _cancel_all(self) -> None:
        """Queued and running requests end 'cancelled' (running ones aborted in vLLM); queued adapter changes 503."""
        with self._lock:
            pending, self._pending = self._pending, []
            control, self._control = self._control, []
        for _, done in control:
            done.set_exception(APIError(503, "the server is shutting down", "server_error"))
        if self._live:
            try:
                self.llm.abort_request(list(self._live))
            except Exception:
                logger.exception("aborting the running requests failed")
        for h in [p[0] for p in pending] + list(self._live.values()):
            h._emit(Event(finish_reason="cancelled", error="the server is shutting down"))
        self._live.clear()

    def close(self) -> None:
        """Stop the loop and shut vLLM's engine down."""
        self.stop()
        self.close_engine()

    def step(self) -> None:
        """One round, in the engine's thread: add the pending requests, abort the cancelled ones, step vLLM."""
        with self._lock:
            pending, self._pending = self._pending, []
        for h, prompt, params, lora in pending:
            if h._cancel:
                h._emit(Event(finish_reason="cancelled"))
                continue
            request_id = f"iapt-{h.id}"  # vLLM's outputs and aborts use this id (it adds a suffix inside)
            try:
                self.llm.add_request(request_id, prompt, params, lora_request=lora)
            except Exception as exc:
                logger.exception("adding request %d failed", h.id)
                h._emit(Event(finish_reason="error", error=f"the request was refused: {exc}"))
                continue
            self._live[request_id] = h
        cancelled = [rid for rid, h in self._live.items() if h._cancel]
        if cancelled:
            self.llm.abort_request(cancelled)
            for rid in cancelled:
                self._live.pop(rid)._emit(Event(finish_reason="cancelled"))
        if not self._live:
            return
        try:
            outputs = self.llm.step()
        except Exception as exc:  # cannot tell which request broke the step: fail them all
            logger.exception("vLLM step failed")
            failed, self._live = self._live, {}
            try:
                self.llm.abort_request(list(failed))
            except Exception:
                logger.exception("aborting the failed requests failed")
            for gone in failed.values():
                gone._emit(Event(finish_reason="error", error=f"generation step failed: {exc}"))
            if type(exc).__name__ == "EngineDeadError":  # the engine core is gone: stop, so /health says so
                self.dead = str(exc) or "EngineDeadError"
                self._stop.set()
                with self._lock:
                    pending, self._pending = self._pending, []
                for h, *_ in pending:
                    h._emit(Event(finish_reason="error", error=f"the vLLM engine has stopped ({self.dead})"))
            return
        now, count = time.monotonic(), 0
        for out in outputs:
            handle = self._live.get(out.request_id)
            if handle is None or not out.outputs:
                continue
            h, completion = handle, out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = list(completion.logprobs or []) if h.request.logprobs is not None else []
            for i, token in enumerate(tokens):
                entry = logprobs[i] if i < len(logprobs) else None
                h._emit(Event(token=int(token), logprob=_logprob(int(token), entry, h.request.logprobs)))
            count += len(tokens)
            if out.finished:
                del self._live[out.request_id]
                reason = completion.finish_reason
                if reason in ("stop", "length"):
                    h._emit(Event(finish_reason=reason))
                    self.requests_finished += 1
                elif reason == "abort":
                    h._emit(Event(finish_reason="cancelled"))
                else:
                    h._emit(Event(finish_reason="error", error=f"vLLM ended the request: {reason}"))
        if count:
            self.tokens_generated += count
            self._token_times.append((now, count))
        while self._token_times and now - self._token_times[0][0] > 10.0:
            self._token_times.popleft()

    # -------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        """Queue length, requests decoding, tokens/s over the last 10 s, totals: what /metrics exports."""
        now = time.monotonic()
        times = [(t, n) for t, n in list(self._token_times) if now - t <= 10.0]
        window = sum(n for _, n in times)
        span = now - times[0][0] if times else 0.0
        live = list(self._live.values())
        return {
            "waiting": len(self._pending) + sum(1 for h in live if not h.tokens),
            "running": sum(1 for h in live if h.tokens),
            "tokens_per_second": window / max(span, 1.0) if window else 0.0,
            "tokens_generated": self.tokens_generated,
            "requests_finished": self.requests_finished,
            "adapters": len(self._adapters),
        }


def _make_engine(args: dict[str, Any]) -> Any:
    from vllm import EngineArgs, LLMEngine

    return LLMEngine.from_engine_args(EngineArgs(**args))


def _seed(seed: int) -> int:
    """The API's seed range (torch's, [-2**63, 2**64)) folded into [0, 2**63): vLLM reads -1 as no seed."""
    return seed % 2**63


def _logprob(token: int, entry: Mapping[int, Any] | None, top: int | None) -> TokenLogprob | None:
    """vLLM's ``{token id: Logprob(logprob, rank)}`` of one position as the project's :class:`TokenLogprob`."""
    if top is None or entry is None:
        return None
    ranked = sorted(
        ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top), key=lambda item: item[1].rank
    )
    chosen = entry.get(token)
    value = float(chosen.logprob) if chosen is not None else -math.inf
    return TokenLogprob(token, value, [(int(t), float(lp.logprob)) for t, lp in ranked[:top]])


# ------------------------------------------------------------------------------------------ serving
def model_folder(model: str) -> str:
    """A local folder vLLM can load: ``model`` itself, or for 'default' the packaged model's float32 cache
    (built from the packaged GGUF on first use, as the built-in engine's ``load_model`` does)."""
    from iapt.models import CACHE_SUBDIR, DEFAULT_ALIASES, cache_root, load_model

    if model.strip().lower() not in {alias.lower() for alias in DEFAULT_ALIASES}:
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"--engine vllm serves a local model folder; {model!r} is none")
        return str(Path(model).expanduser())
    folder = cache_root() / CACHE_SUBDIR
    if not (folder / "config.json").is_file():
        load_model("default")  # builds the cache once
    return str(folder)


def serve(
    model: str = "default",
    adapters_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    keys_file: str | Path | None = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_prompt_tokens: int = 2048,
    max_tokens_limit: int = 1024,
    dtype: str = "float32",
    log_level: str = "info",
    max_bottleneck: int = 512,
    max_soft_tokens: int = 64,
    docs: bool = True,
    api_key: str | None = None,
    served_model_name: str | Sequence[str] | None = None,
    lora_modules: Mapping[str, str | Path] | None = None,
    max_model_len: int | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """``iapt serve --engine vllm``: the project's OpenAI API (:func:`iapt.serving.app.create_app`) on a
    :class:`VLLMEngine`; the options mean what they mean for the built-in engine's ``serve``."""
    from typing import cast

    from iapt.models import DEFAULT_ALIASES, DEFAULT_NAME
    from iapt.serving.app import run_server, serve_options
    from iapt.serving.engine import Engine

    keys, names, modules = serve_options(
        host,
        port,
        keys_file,
        api_key,
        served_model_name,
        lora_modules,
        kinds=("IAPT", "LORA"),
        refusal="--engine vllm serves IAPT and LoRA adapters",
    )
    is_default = model.strip().lower() in {alias.lower() for alias in DEFAULT_ALIASES}
    engine = VLLMEngine(
        model_folder(model),
        adapters_dir,
        adapters=modules,
        base_name=names[0] if names else model,
        base_aliases=names[1:] if names else ([DEFAULT_NAME] if is_default else []),
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_bottleneck=max_bottleneck,
        max_soft_tokens=max_soft_tokens,
        dtype=dtype,
        max_model_len=max_model_len,
        engine_kwargs=engine_kwargs,
    )
    # The app is typed for the built-in engine; VLLMEngine has every member it uses (tests/vllm/test_server.py).
    run_server(
        cast(Engine, engine),
        keys,
        host=host,
        port=port,
        log_level=log_level,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        docs=docs,
    )
