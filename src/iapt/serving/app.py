"""OpenAI-compatible HTTP front of the engine, multi-adapter the way vLLM serves LoRAs.

``model`` in a request names the adapter (or the base model). The engine runs in one background thread
that owns the model; handlers submit requests and receive events through ``loop.call_soon_threadsafe``
into an asyncio queue, so no request ever blocks the event loop or another request. What protects the
server under load: a bounded queue (429 + Retry-After), limits on prompt length and ``max_tokens``
(400), validation before anything reaches the model, a disconnected client's request cancelled (its batch
row freed), and the engine isolating a failing prefill to the request that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import jinja2
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

import iapt
from iapt.serving.auth import KeyRing, Principal
from iapt.serving.detokenizer import IncrementalDetokenizer
from iapt.serving.engine import (
    Engine,
    Event,
    QueueFull,
    Request,
    RequestHandle,
    TokenLogprob,
    UnknownAdapter,
)
from iapt.serving.protocol import (
    _GENERATE,
    _KINDS,
    SEED_MAX,
    SEED_MIN,
    AdapterStatus,
    APIError,
    ChatBody,
    ChatMessage,
    CompletionBody,
    DetokenizeBody,
    DetokenizeResponse,
    Health,
    LoadAdapterBody,
    ModelCard,
    ModelList,
    TextPart,
    TokenizeBody,
    TokenizeChatBody,
    TokenizeResponse,
    UnloadAdapterBody,
    Version,
    _Body,
    _errors,
    _lone_surrogate,
    _model_not_found,
    _union_label,
)

logger = logging.getLogger(__name__)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before they are read into memory.

    A chunked body (no Content-Length) is read here, up to the limit, and answered 413 as soon as it
    passes it; the app then receives it whole.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over {self.limit} bytes").response()
        headers = dict(scope["headers"])
        if b"content-length" not in headers:
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return None  # the client went away
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limit:
                    return await too_large(scope, receive, send)
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        length = headers[b"content-length"]
        if not length.isdigit() or int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            return {"type": "http.disconnect"} if seen > self.limit else message

        return await self.app(scope, limited, send)


# ------------------------------------------------------------------------------------------ metrics
class _EngineCollector:
    """Read the engine's numbers at scrape time (queue length, batch size, tokens/s, totals)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.engine.stats()
        yield GaugeMetricFamily("iapt_queue_length", "Requests waiting for a batch row", value=s["waiting"])
        yield GaugeMetricFamily("iapt_batch_size", "Requests being decoded in the running batch", value=s["running"])
        yield GaugeMetricFamily(
            "iapt_tokens_per_second", "Generated tokens per second, last 10 s", value=s["tokens_per_second"]
        )
        yield GaugeMetricFamily("iapt_adapters_loaded", "Adapters in the registry", value=s["adapters"])
        yield CounterMetricFamily("iapt_generated_tokens", "Tokens generated since start", value=s["tokens_generated"])


# ------------------------------------------------------------------------------------------ app
class OpenAIServing:
    """The handlers' shared work: authentication, limits, tokenization, generation through the engine, and the
    OpenAI response and stream shapes. ``create_app`` routes each endpoint to it (as vLLM's ``OpenAIServing*``)."""

    def __init__(
        self,
        engine: Engine,
        keys: KeyRing,
        requests_total: Counter,
        *,
        max_prompt_tokens: int,
        max_tokens_limit: int,
        max_n: int,
        disconnect_poll_s: float,
    ) -> None:
        self.engine, self.keys, self.tokenizer = engine, keys, engine.tokenizer
        self.requests_total = requests_total
        self.max_prompt_tokens, self.max_tokens_limit, self.max_n = max_prompt_tokens, max_tokens_limit, max_n
        self.disconnect_poll_s = disconnect_poll_s

    def count(self, request: HTTPRequest, status: int) -> None:
        if request.url.path in ("/v1/completions", "/v1/chat/completions"):
            tenant = getattr(request.state, "tenant", "unauthenticated")
            self.requests_total.labels(tenant, getattr(request.state, "model", "unknown"), str(status)).inc()

    def auth(self, request: HTTPRequest, admin: bool = False) -> Principal:
        principal = self.keys.authenticate(request.headers.get("authorization"))
        if principal is None:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')", "authentication_error")
        request.state.tenant = principal.tenant
        if admin and not principal.admin:
            raise APIError(403, "this needs an admin key", "permission_error")
        return principal

    def check_model(self, request: HTTPRequest, principal: Principal, model: str) -> str | None:
        """Resolve ``model``: None for the base, else the adapter name; 404 whether unknown or not yours."""
        is_base = model in self.engine.base_names
        if (not is_base and model not in self.engine.adapters) or not principal.may_use(model, is_base):
            raise _model_not_found(model)
        request.state.model = model
        return None if is_base else model

    def check_common(self, body: _Body, prompts: list[list[int]], adapter: str | None, chat: bool) -> int:
        """Limits (400) and unsupported options; returns max_tokens."""
        if body.n > self.max_n:
            raise APIError(400, f"n={body.n} is above this server's limit of {self.max_n}")
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty")
            if len(p) > self.max_prompt_tokens:
                raise APIError(
                    400, f"the prompt has {len(p)} tokens; this server accepts at most {self.max_prompt_tokens}"
                )
        completion_limit = getattr(body, "max_completion_tokens", None)  # chat bodies only (OpenAI's newer name)
        max_tokens = completion_limit if chat and completion_limit is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens_limit if chat else 16
            if chat and self.engine.max_positions:  # chat: as much as the context allows, like vLLM
                loaded = self.engine.adapters.get(adapter or "")
                slots = loaded.config.num_slots if loaded else 0
                room = self.engine.max_positions - slots - max(len(p) for p in prompts)
                max_tokens = max(1, min(max_tokens, room))
        if max_tokens < 1:  # the schema says so too; kept for callers that bypass it
            raise APIError(400, "max_tokens must be at least 1")
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.max_tokens_limit}")
        return max_tokens

    def encode_prompts(self, prompt: Any) -> list[list[int]]:
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise APIError(400, "the prompt is empty")
        return [self.tokenize(p) if isinstance(p, str) else list(p) for p in items]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if (problem := _lone_surrogate(text, "prompt")) is not None:  # bodies are checked; this is the backstop
            raise APIError(400, problem)
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def chat_text(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The chat template's prompt text for ``messages`` (the same for /v1/chat/completions and /tokenize)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        rendered = [
            {"role": m.role, "content": _content(m.content), **({"name": m.name} if m.name else {})} for m in messages
        ]
        try:
            return self.tokenizer.apply_chat_template(
                rendered, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # e.g. a role order it rejects
            raise APIError(400, f"the chat template rejected the messages: {exc}") from None

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8", "replace"))}

        return {
            "content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
        }

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """OpenAI's legacy ``logprobs``: tokens, token_logprobs, top_logprobs (the k most likely and the sampled
        token, as OpenAI and vLLM give), text_offset (from ``offset``, where the text so far ends)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.token_text(e.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(max(e.logprob, -9999.0))
            top = {self.token_text(t): max(v, -9999.0) for t, v in e.top}
            out["top_logprobs"].append({**top, text: max(e.logprob, -9999.0)})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def generate(
        self, request: HTTPRequest, body: _Body, prompts: list[list[int]], adapter: str | None, chat: bool
    ) -> Response:
        max_tokens = self.check_common(body, prompts, adapter, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def listener(i: int):
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (i, event))

        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top_logprobs = body.top_logprob_count()
        engine_requests = [
            Request(
                p,
                adapter,
                max_tokens,
                body.temperature,
                body.top_p,
                None if body.seed is None else body.seed + j,
                ignore_eos=body.ignore_eos,
                on_event=listener(k * body.n + j),
                top_k=body.top_k or 0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0,
                logprobs=top_logprobs,
            )
            for k, p in enumerate(prompts)
            for j in range(body.n)
        ]
        try:
            handles = self.engine.submit_many(engine_requests)
        except QueueFull as exc:
            raise APIError(
                429, str(exc), "rate_limit_error", {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            ) from None
        except UnknownAdapter:
            raise _model_not_found(body.model) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        texts = [IncrementalDetokenizer(self.tokenizer, stop) for _ in handles]
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model,
        }
        usage = {"prompt_tokens": sum(len(p) for p in prompts)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            self.count(request, 200)  # the status line goes out now; an error later is an event in the stream
            return StreamingResponse(
                self.stream(
                    request, handles, texts, events, meta, usage, chat, include_usage, top_logprobs is not None
                ),
                media_type="text/event-stream",
            )
        try:
            async for _ in self.events(request, handles, texts, events):
                pass
        finally:
            _cancel_unfinished(handles)
        if getattr(request.state, "disconnected", False):
            self.count(request, 499)  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        failed = next((h for h in handles if h.finish_reason == "error"), None)
        if failed is not None:
            raise _failure(failed, body.model)
        choices = []
        for i, (h, t) in enumerate(zip(handles, texts, strict=True)):
            reason = t.finish_reason or _reason(h)
            content = t.text
            logprobs = None
            if top_logprobs is not None:  # the tokens the text holds: up to a stop string, not past it
                entries = h.logprobs[: len(t.tokens)]
                logprobs = self.chat_logprobs(entries) if chat else self.completion_logprobs(entries)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }
                if chat
                else {"index": i, "text": content, "logprobs": logprobs, "finish_reason": reason}
            )
        usage = _usage(usage, handles)
        obj = "chat.completion" if chat else "text_completion"
        self.count(request, 200)
        return JSONResponse({**meta, "object": obj, "choices": choices, "usage": usage})

    async def events(
        self,
        request: HTTPRequest,
        handles: list[RequestHandle],
        texts: list[IncrementalDetokenizer],
        events: asyncio.Queue,
    ) -> AsyncIterator[tuple[int, str, str | None, str | None, list[TokenLogprob]]]:
        """Yield (choice, new text, finish reason, error, logprobs of the tokens since the last yield) until every
        choice is done.

        Checks every ``self.disconnect_poll_s`` that the client is still there, whether or not tokens arrive (a
        running request sends them continuously), and stops if it is not: the caller cancels the rows.
        """
        done = [False] * len(handles)
        pending: list[list[TokenLogprob]] = [[] for _ in handles]

        def taken(i: int) -> list[TokenLogprob]:
            out, pending[i] = pending[i], []
            return out

        checked = time.monotonic()
        while not all(done):
            if time.monotonic() - checked >= self.disconnect_poll_s:
                checked = time.monotonic()
                if await request.is_disconnected():
                    logger.info("client went away; cancelling %d request(s)", len(handles))
                    request.state.disconnected = True
                    return
            try:
                i, event = await asyncio.wait_for(events.get(), timeout=self.disconnect_poll_s)
            except TimeoutError:
                continue
            if done[i]:
                continue
            t = texts[i]
            if event.token is not None:
                if event.logprob is not None:
                    pending[i].append(event.logprob)
                piece = t.add(event.token)
                if t.finish_reason:  # a stop string: free the row now
                    handles[i].cancel()
                    done[i] = True
                    yield i, piece, "stop", None, taken(i)
                elif piece:
                    yield i, piece, None, None, taken(i)
            else:
                done[i] = True
                yield i, t.flush(), _reason_of(event.finish_reason), event.error, taken(i)

    async def stream(
        self,
        request: HTTPRequest,
        handles: list[RequestHandle],
        texts: list[IncrementalDetokenizer],
        events: asyncio.Queue,
        meta: dict,
        usage: dict,
        chat: bool,
        include_usage: bool,
        with_logprobs: bool,
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        offsets = [0] * len(handles)  # where each choice's text so far ends, for text_offset

        def chunk(
            i: int,
            text: str | None,
            reason: str | None,
            logprobs: list[TokenLogprob] | None = None,
            first: bool = False,
        ) -> str:
            """One choice's chunk; with logprobs, those of the tokens that arrived since its last chunk."""
            lp = None
            if with_logprobs and not first:
                if chat:
                    lp = self.chat_logprobs(logprobs or [])
                else:
                    lp = self.completion_logprobs(logprobs or [], offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}
            return _sse({**meta, "object": obj, "choices": [choice]})

        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk(i, None, None, first=True)
            async for i, piece, reason, error, logprobs in self.events(request, handles, texts, events):
                if error is not None:
                    yield _sse(json.loads(bytes(_failure(handles[i], meta["model"]).response().body)))
                    return
                if piece or reason:
                    yield chunk(i, piece, reason, logprobs)
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(usage, handles)})
            yield "data: [DONE]\n\n"
        finally:
            _cancel_unfinished(handles)


def create_app(
    engine: Engine,
    keys: KeyRing | None = None,
    *,
    max_prompt_tokens: int = 2048,
    max_tokens_limit: int = 1024,
    max_n: int = 8,
    max_body_bytes: int = 1 << 20,
    manage_engine: bool = True,
    docs: bool = True,
    disconnect_poll_s: float = 0.25,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app. With ``manage_engine`` its lifespan starts and stops the engine's thread.

    ``docs``: serve ``/openapi.json`` and ``/docs`` (to holders of a valid key, like the API itself);
    ``disconnect_poll_s``: how often a waiting handler checks that its client is still there;
    ``api_key``: one more key, with access to everything (vLLM's ``--api-key``), beside ``keys``.
    """
    keys = keys or KeyRing(None)
    if api_key is not None:
        keys = keys.with_api_key(api_key)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("the HTTP server needs the engine's tokenizer (Engine(model, tokenizer, ...))")
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    requests_total = Counter(
        "iapt_requests",
        "Completion requests by tenant, model and HTTP status",
        ["tenant", "model", "status"],
        registry=registry,
    )

    serving = OpenAIServing(
        engine,
        keys,
        requests_total,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_n=max_n,
        disconnect_poll_s=disconnect_poll_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="iapt serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException) -> Response:
        """Starlette's own errors (no such route, wrong method, a body that does not parse) in OpenAI's shape."""
        status = exc.status_code
        if status == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif status == 400:
            message = "the request body could not be parsed as JSON (too deeply nested, or not UTF-8)"
        else:
            message = str(exc.detail)
        serving.count(request, status)
        headers = dict(exc.headers or {})
        return APIError(status, message, _KINDS.get(status, "invalid_request_error"), headers or None).response()

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
        serving.count(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        where = [".".join(str(p) for p in e.get("loc", ())[1:] if not _union_label(p)) or "body" for e in errors]
        problems = "; ".join(
            dict.fromkeys(
                f"`{w}` is not supported by this server; remove it"
                if e.get("type") == "extra_forbidden"
                else f"{w}: {e.get('msg')}"
                for w, e in zip(where, errors, strict=True)
            )
        )
        serving.count(request, 400)
        return APIError(400, f"invalid request: {problems}", param=where[0] if errors else None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: HTTPRequest, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        serving.count(request, 500)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    # -------------------------------------------------------------------- routes
    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health}, **_errors(413)})
    async def health() -> JSONResponse:
        """Open to all, so it says only whether the engine runs; the numbers are in /metrics (admin)."""
        ok = engine.is_running or not manage_engine
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
            **_errors(401, 403, 413),
        },
    )
    async def metrics(request: HTTPRequest) -> Response:
        if not keys.open:
            serving.auth(request, admin=True)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def _card(name: str, is_base: bool, created: int) -> dict[str, Any]:
        """A model object; no file paths: they tell a tenant about the server."""
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "iapt",
            "root": name,
            "parent": None if is_base else engine.base_name,
        }

    @app.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401, 413)})
    async def models(request: HTTPRequest) -> JSONResponse:
        principal = serving.auth(request)
        created = int(time.time())
        data = []
        if principal.may_use(engine.base_name, True):
            data.append(_card(engine.base_name, True, created))
        data += [_card(name, False, created) for name in sorted(engine.adapters) if principal.may_use(name, False)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model:path}", responses={200: {"model": ModelCard}, **_errors(401, 404, 413)})
    async def model_card(request: HTTPRequest, model: str) -> JSONResponse:
        """One model, as in /v1/models; 404 (the same answer) for one that does not exist or is not the caller's."""
        principal = serving.auth(request)
        is_base = model in engine.base_names
        if (not is_base and model not in engine.adapters) or not principal.may_use(model, is_base):
            raise _model_not_found(model)
        return JSONResponse(_card(engine.base_name if is_base else model, is_base, int(time.time())))

    @app.post("/v1/completions", responses=_GENERATE)
    async def completions(request: HTTPRequest, body: CompletionBody) -> Response:
        principal = serving.auth(request)
        adapter = serving.check_model(request, principal, body.model)
        if body.echo or (body.best_of or 1) > 1:
            raise APIError(400, "echo and best_of > 1 are not supported by this server")
        return await serving.generate(request, body, serving.encode_prompts(body.prompt), adapter, chat=False)

    @app.post("/v1/chat/completions", responses=_GENERATE)
    async def chat_completions(request: HTTPRequest, body: ChatBody) -> Response:
        principal = serving.auth(request)
        adapter = serving.check_model(request, principal, body.model)
        text = serving.chat_text(body.messages)
        return await serving.generate(request, body, [serving.tokenize(text, special=False)], adapter, chat=True)

    @app.post("/v1/load_lora_adapter", responses={200: {"model": AdapterStatus}, **_errors(400, 401, 403, 413)})
    @app.post("/v1/load_adapter", responses={200: {"model": AdapterStatus}, **_errors(400, 401, 403, 413)})
    async def load_adapter(request: HTTPRequest, body: LoadAdapterBody) -> JSONResponse:
        """Load an adapter folder under ``lora_name`` (vLLM's name for the call; admin key): IAPT, or with
        ``--engine vllm`` also LoRA."""
        serving.auth(request, admin=True)
        try:
            await asyncio.to_thread(engine.load_adapter, body.lora_name, Path(body.lora_path))
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise APIError(400, f"adapter {body.lora_name!r} not loaded: {exc}") from None
        return JSONResponse({"status": "loaded", "name": body.lora_name})

    @app.post(
        "/v1/unload_lora_adapter", responses={200: {"model": AdapterStatus}, **_errors(400, 401, 403, 404, 409, 413)}
    )
    @app.post("/v1/unload_adapter", responses={200: {"model": AdapterStatus}, **_errors(400, 401, 403, 404, 409, 413)})
    async def unload_adapter(request: HTTPRequest, body: UnloadAdapterBody) -> JSONResponse:
        serving.auth(request, admin=True)
        try:  # off the event loop: copying a large bank takes a while, and /health must answer meanwhile
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        except UnknownAdapter as exc:
            raise APIError(404, str(exc), "not_found_error") from None
        return JSONResponse({"status": "unloaded", "name": body.lora_name})

    def _slots_of(request: HTTPRequest, principal: Principal, model: str | None) -> int:
        """Soft-token slots of ``model`` (404 if it is not the caller's); 0 for the base or no model."""
        if model is None:
            return 0
        adapter = serving.check_model(request, principal, model)
        loaded = engine.adapters.get(adapter or "")
        return loaded.config.num_slots if loaded else 0

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}, **_errors(400, 401, 404, 413)})
    async def tokenize(request: HTTPRequest, body: TokenizeBody) -> JSONResponse:
        """vLLM's /tokenize: a prompt's token ids (or chat messages' as the chat endpoint renders them).

        ``max_model_len`` is what prompt and completion may take together for that model: an adapter's soft
        tokens take positions of the context too."""
        principal = serving.auth(request)
        slots = _slots_of(request, principal, body.model)
        if isinstance(body, TokenizeChatBody):
            text = serving.chat_text(body.messages, body.add_generation_prompt)
        else:
            text = body.prompt
        ids = serving.tokenize(text, special=body.add_special_tokens)
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": engine.max_positions - slots if engine.max_positions else None,
                "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
            }
        )

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}, **_errors(400, 401, 404, 413)})
    async def detokenize(request: HTTPRequest, body: DetokenizeBody) -> JSONResponse:
        """vLLM's /detokenize: token ids back to text (special tokens kept, as vLLM does)."""
        principal = serving.auth(request)
        _slots_of(request, principal, body.model)
        size = len(tokenizer)
        if any(t >= size for t in body.tokens):
            bad = next(t for t in body.tokens if t >= size)
            raise APIError(400, f"token id {bad} is not in the vocabulary (ids are 0 to {size - 1})", param="tokens")
        return JSONResponse({"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)})

    @app.get("/version", responses={200: {"model": Version}, **_errors(413)})
    async def version() -> JSONResponse:
        """Open to all, as vLLM's: the package version only."""
        return JSONResponse({"version": iapt.__version__})

    def openapi() -> dict[str, Any]:
        """The schema as the server behaves: 400 (not FastAPI's 422) for a bad body, this server's limits."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            for item in schema["paths"].values():
                for op in item.values():
                    op["responses"].pop("422", None)
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/health"]["get"]["security"] = []  # open to all, by design
            schema["paths"]["/version"]["get"]["security"] = []
            components["schemas"]["DetokenizeBody"]["properties"]["tokens"]["items"]["maximum"] = len(tokenizer) - 1
            for name in ("CompletionBody", "ChatBody"):
                props = components["schemas"][name]["properties"]
                props["n"]["maximum"] = max_n
                for option in props["seed"]["anyOf"]:  # pydantic writes these bounds as floats (2^63 rounded up)
                    if option.get("type") == "integer":
                        option["minimum"], option["maximum"] = SEED_MIN, SEED_MAX
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in props:
                        for option in props[field].get("anyOf", [props[field]]):
                            if option.get("type") == "integer":
                                option["maximum"] = max_tokens_limit
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if docs:

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_json(request: HTTPRequest) -> JSONResponse:
            serving.auth(request)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs_page(request: HTTPRequest) -> HTMLResponse:
            serving.auth(request)
            from fastapi.openapi.docs import get_swagger_ui_html

            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} docs")

    return app


def _failure(handle: RequestHandle, model: str) -> APIError:
    """The error for a request the engine ended with an error: 404 if its adapter went away meanwhile."""
    if handle.code == "model_not_found":
        return _model_not_found(model)
    return APIError(500, f"generation failed: {handle.error}", "server_error", code=handle.code)


def _content(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _reason_of(engine_reason: str | None) -> str | None:
    return {"cancelled": "abort", "error": "error"}.get(engine_reason or "", engine_reason)


def _reason(handle: RequestHandle) -> str | None:
    return _reason_of(handle.finish_reason)


def _usage(usage: dict, handles: list[RequestHandle]) -> dict:
    completion = sum(len(h.tokens) for h in handles)
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


def _cancel_unfinished(handles: list[RequestHandle]) -> None:
    for h in handles:
        if not h.finished:
            h.cancel()


# ------------------------------------------------------------------------------------------ running
class BackgroundServer:
    """Serve an app with uvicorn in a thread on ``host`` (an ephemeral port by default); for tests and benchmarks.

    ``with BackgroundServer(app) as server: OpenAI(base_url=server.url + "/v1", api_key=...)``
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._socket.close()


def serve_options(
    host: str,
    port: int,
    keys_file: str | Path | None,
    api_key: str | None,
    served_model_name: str | Sequence[str] | None,
    lora_modules: Mapping[str, str | Path] | None,
    kinds: Collection[str],
    refusal: str,
) -> tuple[KeyRing, list[str], dict[str, str | Path]]:
    """What every engine's ``serve`` checks before it loads anything: the keys (``--keys`` and ``--api-key``), a
    warning when the API is open beyond loopback, the served names, and that each ``--lora-modules`` folder is an
    adapter of ``kinds`` (else ValueError ending in ``refusal``): a wrong folder fails in a second, not minutes."""
    from iapt.adapters import adapter_type, resolve_adapter_dir

    keys = KeyRing.from_file(keys_file) if keys_file else KeyRing(None)
    if api_key is not None:
        keys = keys.with_api_key(api_key)
    if keys.open and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("no --keys file or --api-key: the API is open to anyone who can reach %s:%d", host, port)
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if any(not n for n in names):
        raise ValueError("--served-model-name: names must be non-empty")
    modules = dict(lora_modules or {})
    for name, path in modules.items():
        kind = adapter_type(resolve_adapter_dir(path))
        if kind not in kinds:
            raise ValueError(f"--lora-modules {name}={path}: a {kind} adapter; {refusal}")
    return keys, names, modules


def run_server(
    engine: Engine,
    keys: KeyRing,
    *,
    host: str,
    port: int,
    log_level: str,
    max_prompt_tokens: int,
    max_tokens_limit: int,
    docs: bool,
) -> None:
    """Serve ``engine`` (its load errors logged first) until the server stops, then close it, on SIGTERM too."""
    import uvicorn

    try:
        for name, error in engine.load_errors.items():
            logger.warning("adapter %s not loaded: %s", name, error)
        app = create_app(
            engine, keys, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, docs=docs
        )
        with _exit_on_sigterm():
            uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()  # vLLM's engine core is a process of its own: it must not outlive the server


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while serving. uvicorn shuts down on SIGTERM and then raises the signal again;
    with the default action the process would die there, before ``engine.close()`` (orphaning vLLM's engine core)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
) -> None:
    """Load the backbone and every adapter under ``adapters_dir``, then serve the OpenAI-compatible API.

    vLLM's flags: ``api_key`` (one key with access to everything, beside ``keys_file``), ``served_model_name``
    (the base model's name in the API; several: the first is the one shown, all are accepted) and
    ``lora_modules`` (name -> IAPT adapter folder, loaded at start; any that cannot be is a start-up error,
    unlike a bad subfolder of ``adapters_dir``, which is skipped with a warning).
    """
    from iapt.models import load_model

    keys, names, modules = serve_options(
        host,
        port,
        keys_file,
        api_key,
        served_model_name,
        lora_modules,
        kinds=("IAPT",),
        refusal="only IAPT adapters are served by the built-in engine (serve LoRA and other PEFT adapters with vLLM)",
    )
    base, tokenizer = load_model(model, dtype=dtype)
    engine = Engine(
        base,
        tokenizer,
        adapters_dir,
        base_name=names[0] if names else model,
        base_aliases=names[1:] if names else None,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_bottleneck=max_bottleneck,
        max_soft_tokens=max_soft_tokens,
    )
    try:
        for name, path in modules.items():
            try:
                engine.load_adapter(name, path)
            except (ValueError, FileNotFoundError, OSError) as exc:
                raise ValueError(f"--lora-modules {name}={path}: {exc}") from None
    except BaseException:
        engine.close()
        raise
    run_server(
        engine,
        keys,
        host=host,
        port=port,
        log_level=log_level,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        docs=docs,
    )
