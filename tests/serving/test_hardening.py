"""Regressions of a red-team pass on the HTTP server: each test failed on the server before its fix."""

from __future__ import annotations

import re
import shutil
import threading
import time

import httpx
import pytest

from iapt.serving import Engine, create_app
from iapt.serving.app import BackgroundServer
from iapt.serving.auth import KeyRing
from iapt.serving.engine import AdapterBank
from tests.serving.test_app import KEYS, MAX_PROMPT, MAX_TOKENS, client, post, wait_for
from tests.tiny import tiny_lm


@pytest.fixture(scope="module")
def server(adapters_dir, tokenizer, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(KEYS)
    engine = Engine(
        tiny_lm().eval(),
        tokenizer,
        adapters_dir,
        base_name="tiny",
        max_batch_size=4,
        max_queue=4,
        max_bottleneck=64,
        max_soft_tokens=8,
    )
    app = create_app(
        engine,
        KeyRing.from_file(keys_file),
        max_prompt_tokens=MAX_PROMPT,
        max_tokens_limit=MAX_TOKENS,
        disconnect_poll_s=0.1,
    )
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv
    engine.close()


@pytest.fixture
def slow_decode(server, monkeypatch):
    decode = server.engine._decode

    def slow() -> None:
        time.sleep(0.05)
        decode()

    monkeypatch.setattr(server.engine, "_decode", slow)


def openai_error(r: httpx.Response, status: int) -> dict:
    """The response is ``status`` with OpenAI's error shape and nothing else; returns its error object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------------------ 1: tiny temperatures
def test_a_tiny_temperature_fails_no_one(server, slow_decode, reference, tokenizer):
    """temperature 1e-37 overflowed float32 in the shared decode step: a neighbour's greedy request got 500."""
    ids = [60, 61, 62, 63]
    out = {}

    def greedy() -> None:
        out["greedy"] = post(
            server,
            "/v1/completions",
            {"model": "tiny", "prompt": ids, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        )

    worker = threading.Thread(target=greedy)
    worker.start()
    tiny = [
        post(server, "/v1/completions", {"model": "alice", "prompt": "x", "max_tokens": 5, "temperature": t})
        for t in (1e-37, 5e-324, 1e-3)
    ]
    worker.join(60)
    assert [r.status_code for r in tiny] == [200] * 3, [r.text for r in tiny]
    assert out["greedy"].status_code == 200
    expected = tokenizer.decode(reference(None, ids, 20), skip_special_tokens=True)
    assert out["greedy"].json()["choices"][0]["text"] == expected


# ------------------------------------------------------------------------------------------ 2: disconnects
def test_a_non_streaming_client_that_hangs_up_is_cancelled_while_running(server, slow_decode, handles):
    body = {"model": "alice", "prompt": "go", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.4)  # 40 tokens at 50 ms: 2 s if not cancelled
    wait_for(lambda: handles and handles[0].finished, timeout=5)
    assert handles[0].finish_reason == "cancelled" and 0 < len(handles[0].tokens) < MAX_TOKENS


# ------------------------------------------------------------------------------------------ 3: unload off the loop
def test_unloading_does_not_freeze_the_server(server, adapters_dir, monkeypatch):
    assert (
        post(
            server, "/v1/load_adapter", {"lora_name": "bulky", "lora_path": str(adapters_dir / "alice")}, key="sk-admin"
        ).status_code
        == 200
    )
    without = AdapterBank.without

    def slow_without(self, name):  # a large bank takes seconds to copy
        time.sleep(1.5)
        return without(self, name)

    monkeypatch.setattr(AdapterBank, "without", slow_without)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(r=post(server, "/v1/unload_adapter", {"lora_name": "bulky"}, key="sk-admin"))
    )
    worker.start()
    time.sleep(0.2)
    start = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    served = client(server).completions.create(model="alice", prompt="x", max_tokens=2)  # the engine admits too
    elapsed = time.monotonic() - start
    worker.join(10)
    assert served.choices and elapsed < 1.0, elapsed
    assert result["r"].status_code == 200 and "bulky" not in server.engine.adapters


# ------------------------------------------------------------------------------------------ 4, 9: adapters refused
def test_adapters_over_the_limits_or_with_non_finite_weights_are_refused(server, adapters_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.serving.conftest import save_adapter

    save_adapter(tiny_lm(), tmp_path / "huge", 3, bottleneck=2048)
    r = post(server, "/v1/load_adapter", {"lora_name": "huge", "lora_path": str(tmp_path / "huge")}, key="sk-admin")
    assert "max_bottleneck=64" in openai_error(r, 400)["message"]
    shutil.copytree(adapters_dir / "alice", tmp_path / "nan")
    weights = tmp_path / "nan" / "adapter_model.safetensors"
    state = load_file(weights)
    state["0.down.weight"][1, 2] = float("inf")
    save_file(state, weights)
    r = post(server, "/v1/load_adapter", {"lora_name": "nan", "lora_path": str(tmp_path / "nan")}, key="sk-admin")
    assert "'0.down.weight' has NaN or infinite values" in openai_error(r, 400)["message"]
    assert {"huge", "nan"}.isdisjoint(server.engine.adapters)


# ------------------------------------------------------------------------------------------ 5, 6: bad values
@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "alice", "prompt": "\\ud800abc"}',
        b'{"model": "alice", "prompt": ["ok", "\\udfff"]}',
        b'{"model": "\\ud800", "prompt": "x"}',
        b'{"model": "alice", "prompt": "x", "stop": ["\\ud800"]}',
        b'{"model": "alice", "prompt": "x", "seed": 18446744073709551616}',
        b'{"model": "alice", "prompt": "x", "seed": -9223372036854775809}',
        b'{"model": "alice", "prompt": "x", "temperature": NaN}',
        b'{"model": "alice", "prompt": ""}',
        b'{"model": "alice", "prompt": []}',
    ],
)
def test_bad_values_answer_400(server, body):
    assert openai_error(post(server, "/v1/completions", body), 400)["type"] == "invalid_request_error"


def test_lone_surrogate_in_chat_content_answers_400(server):
    body = b'{"model": "alice", "messages": [{"role": "user", "content": "\\ud800abc"}]}'
    assert "surrogate" in openai_error(post(server, "/v1/chat/completions", body), 400)["message"]


def test_a_large_seed_in_range_is_served(server):
    r = post(
        server,
        "/v1/completions",
        {"model": "alice", "prompt": "x", "max_tokens": 2, "n": 2, "temperature": 1.0, "seed": 2**63 - 1},
    )
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ 7: unloaded while queued
def test_a_request_queued_for_an_unloaded_adapter_gets_404(server, adapters_dir):
    engine = server.engine
    assert (
        post(
            server, "/v1/load_adapter", {"lora_name": "brief", "lora_path": str(adapters_dir / "bob")}, key="sk-admin"
        ).status_code
        == 200
    )
    result = {}
    engine.pause()
    try:
        worker = threading.Thread(
            target=lambda: result.update(
                r=post(server, "/v1/completions", {"model": "brief", "prompt": "x", "max_tokens": 2}, key="sk-admin")
            )
        )
        worker.start()
        wait_for(lambda: engine.stats()["waiting"] == 1)
        assert post(server, "/v1/unload_adapter", {"lora_name": "brief"}, key="sk-admin").status_code == 200
    finally:
        engine.resume()
    worker.join(30)
    assert openai_error(result["r"], 404)["code"] == "model_not_found"


# ------------------------------------------------------------------------------------------ 8: metrics
def test_a_failed_request_is_counted_once_with_its_final_status(server, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "_prefill_batch", broken)
    r = post(server, "/v1/completions", {"model": "carol", "prompt": "x", "max_tokens": 2}, key="sk-admin")
    assert openai_error(r, 500)["type"] == "server_error"
    monkeypatch.undo()
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    counted = re.findall(r'iapt_requests_total\{model="carol",status="(\d+)",tenant="ops"\} (\S+)', text)
    assert counted == [("500", "1.0")], counted


# ------------------------------------------------------------------------------------------ 13: leaks
def test_no_paths_stats_or_docs_for_strangers(server, tokenizer):
    admin = client(server, "sk-admin").models.list()
    assert all(m.root == m.id for m in admin.data), [m.root for m in admin.data]
    health = httpx.get(server.url + "/health")
    assert health.json() == {"status": "ok"}
    for path in ("/docs", "/openapi.json"):
        assert openai_error(httpx.get(server.url + path), 401)["type"] == "authentication_error"
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer sk-bob"}).status_code == 200
    assert openai_error(httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-bob"}), 403)
    engine = Engine(tiny_lm().eval(), tokenizer, base_name="tiny")
    with BackgroundServer(create_app(engine, docs=False)) as quiet:
        for path in ("/docs", "/openapi.json", "/redoc"):
            openai_error(httpx.get(quiet.url + path), 404)
    engine.close()


# ------------------------------------------------------------------------------------------ 14: the schema
def test_the_openapi_document_matches_the_server(server):
    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer sk-alice"}).json()
    assert "422" not in str({p: {m: op["responses"] for m, op in item.items()} for p, item in schema["paths"].items()})
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429"} <= set(completions)
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "Retry-After" in completions["429"]["headers"]
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    body = schema["components"]["schemas"]["CompletionBody"]["properties"]
    assert {"type": "string", "minLength": 1} in body["prompt"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS} in body["max_tokens"]["anyOf"]
    assert {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1} in body["seed"]["anyOf"]


# ------------------------------------------------------------------------------------------ 15: parse errors
def test_parse_errors_and_unknown_routes_answer_in_openais_shape(server):
    deep = b'{"model": "alice", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    openai_error(post(server, "/v1/completions", deep), 400)
    openai_error(post(server, "/v1/completions", b'{"model": "alice", "prompt": "caf\xe9"}'), 400)
    openai_error(httpx.get(server.url + "/v1/nowhere"), 404)
    openai_error(httpx.get(server.url + "/v1/completions"), 405)

    def chunks():
        for _ in range(10):
            yield b"x" * (1 << 20)

    r = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        timeout=30,
        headers={"Authorization": "Bearer sk-alice", "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers  # chunked: the size is known only while reading
    openai_error(r, 413)
