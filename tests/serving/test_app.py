"""The OpenAI-compatible server, through the real `openai` client and httpx, on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from iapt.serving import Engine, create_app
from iapt.serving.app import BackgroundServer
from iapt.serving.auth import KeyRing
from tests.tiny import tiny_lm

torch.set_num_threads(1)

KEYS = """
keys:
  sk-alice: {tenant: alice, adapters: [alice]}
  sk-bob: {tenant: bob, adapters: ["bob*"], base: false}
  sk-admin: {tenant: ops, admin: true}
"""
MAX_PROMPT, MAX_TOKENS, MAX_QUEUE = 60, 40, 2


@pytest.fixture(scope="module")
def server(adapters_dir, tokenizer, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(KEYS)
    engine = Engine(tiny_lm().eval(), tokenizer, adapters_dir, base_name="tiny", max_batch_size=4, max_queue=MAX_QUEUE)
    app = create_app(engine, KeyRing.from_file(keys_file), max_prompt_tokens=MAX_PROMPT, max_tokens_limit=MAX_TOKENS)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv
    assert not engine.is_running, "the app's lifespan stops the engine"
    engine.close()


def client(server, key: str | None = "sk-alice") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=30)


def post(server, path: str, body, key: str | None = "sk-alice", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        server.url + path,
        content=content,
        headers={**headers, "Content-Type": "application/json"},
        timeout=kw.pop("timeout", 30),
        **kw,
    )


@pytest.fixture
def slow_decode(server, monkeypatch):
    """Make each decode step take ~20 ms so a test can act while a request is running."""
    engine = server.engine
    decode = engine._decode

    def slow() -> None:
        time.sleep(0.02)
        decode()

    monkeypatch.setattr(engine, "_decode", slow)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------ API
def test_models_list_what_each_key_may_use(server):
    assert [m.id for m in client(server).models.list()] == ["tiny", "alice"]
    assert [m.id for m in client(server, "sk-bob").models.list()] == ["bob"]
    assert {m.id for m in client(server, "sk-admin").models.list()} == {"tiny", "alice", "bob", "carol"}
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completions_match_offline_generate(server, reference, adapters_dir, tokenizer):
    c = client(server)
    out = c.completions.create(model="alice", prompt=["Hello there", "Why?"], max_tokens=12, temperature=0)
    for choice, prompt in zip(out.choices, ["Hello there", "Why?"], strict=True):
        ids = tokenizer(prompt).input_ids
        assert choice.text == text_of(tokenizer, reference(adapters_dir / "alice", ids, 12))
    assert out.usage.prompt_tokens == len("Hello there") + len("Why?")
    ids = [40, 41, 42, 43, 44]
    base = c.completions.create(model="tiny", prompt=ids, max_tokens=9, temperature=0)
    assert base.choices[0].text == text_of(tokenizer, reference(None, ids, 9))
    # A stop string cuts the text and ends the choice with finish_reason "stop".
    full = text_of(tokenizer, reference(adapters_dir / "alice", ids, 12))
    cut = c.completions.create(model="alice", prompt=ids, max_tokens=12, temperature=0, stop=[full[3:5]])
    assert cut.choices[0].text == full[: full.find(full[3:5])] and cut.choices[0].finish_reason == "stop"


def test_chat_matches_offline_generate(server, reference, adapters_dir, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client(server, "sk-bob").chat.completions.create(model="bob", messages=messages, max_tokens=10, temperature=0)
    expected = reference(adapters_dir / "bob", chat_ids(tokenizer, messages), 10)
    assert out.choices[0].message.content == text_of(tokenizer, expected)
    assert out.choices[0].message.role == "assistant"


def test_streaming_equals_non_streaming(server):
    c = client(server)
    kwargs = {"model": "alice", "prompt": ["Stream me", "and me"], "max_tokens": 10, "temperature": 0}
    whole = c.completions.create(**kwargs)
    parts, reasons, usage = ["", ""], [None, None], None
    for chunk in c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            parts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        usage = chunk.usage or usage
    assert parts == [ch.text for ch in whole.choices]
    assert reasons == [ch.finish_reason for ch in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert streamed == whole.choices[0].message.content


# ------------------------------------------------------------------------------------------ tenants
def test_keys_and_tenant_isolation(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").completions.create(model="alice", prompt="x", max_tokens=2)
    assert post(server, "/v1/completions", {"model": "alice", "prompt": "x"}, key=None).status_code == 401
    # Another tenant's adapter, a model the key may not use and a missing one get the same answer (as
    # OpenAI's): a tenant cannot find out which adapters exist.
    answers = []
    for key, model in (("sk-bob", "alice"), ("sk-bob", "tiny"), ("sk-alice", "nobody")):
        with pytest.raises(openai.NotFoundError) as info:
            client(server, key).completions.create(model=model, prompt="x", max_tokens=2)
        answers.append(info.value.response.json())
        assert answers[-1]["error"] == {
            "message": f"The model `{model}` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    r = post(server, "/v1/load_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-alice"}).status_code == 403


def test_load_and_unload_adapters_at_run_time(server, adapters_dir, wrong_base_adapter, reference, tokenizer):
    r = post(server, "/v1/load_adapter", {"lora_name": "mallory", "lora_path": str(wrong_base_adapter)}, key="sk-admin")
    assert r.status_code == 400 and "trained on a base" in r.json()["error"]["message"]
    r = post(
        server, "/v1/load_adapter", {"lora_name": "bob-v2", "lora_path": str(adapters_dir / "carol")}, key="sk-admin"
    )
    assert r.status_code == 200, r.text
    bob = client(server, "sk-bob")
    assert {m.id for m in bob.models.list()} == {"bob", "bob-v2"}
    out = bob.completions.create(model="bob-v2", prompt=[50, 51, 52], max_tokens=6, temperature=0)
    assert out.choices[0].text == text_of(tokenizer, reference(adapters_dir / "carol", [50, 51, 52], 6))
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="bob-v2", prompt="x", max_tokens=2)
    assert post(server, "/v1/unload_adapter", {"lora_name": "bob-v2"}, key="sk-admin").status_code == 200
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model="bob-v2", prompt="x", max_tokens=2)
    assert post(server, "/v1/unload_adapter", {"lora_name": "bob-v2"}, key="sk-admin").status_code == 404
    assert client(server).completions.create(model="alice", prompt="x", max_tokens=2).choices


# ------------------------------------------------------------------------------------------ load
def test_limits_answer_400(server):
    c = client(server)
    cases = [
        {"prompt": "x" * (MAX_PROMPT + 1), "max_tokens": 2},
        {"prompt": "x", "max_tokens": MAX_TOKENS + 1},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": [5, 10_000], "max_tokens": 2},  # not in the vocabulary
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "n": 100},
        {"prompt": "x", "max_tokens": 2, "logprobs": 21},  # over the top-logprobs limit
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="alice", **case)
    for body in (b"{not json", {"model": "alice"}, {"model": "alice", "prompt": {"a": 1}}):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="alice", messages=[])
    assert post(server, "/v1/completions", {"model": "alice", "prompt": "x" * (2 << 20)}).status_code == 413


def test_full_queue_answers_429_with_retry_after(server):
    engine = server.engine
    engine.pause()
    results = []
    try:
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    client(server).completions.create(model="alice", prompt="q", max_tokens=3, temperature=0)
                )
            )
            for _ in range(MAX_QUEUE)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: engine.stats()["waiting"] == MAX_QUEUE)
        with pytest.raises(openai.RateLimitError) as info:
            client(server).completions.create(model="alice", prompt="q", max_tokens=3)
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        engine.resume()
    for t in threads:
        t.join(30)
    assert len(results) == MAX_QUEUE and all(r.choices[0].finish_reason for r in results)


def test_client_disconnect_frees_its_slot(server, slow_decode, handles):
    engine = server.engine
    body = {"model": "alice", "prompt": "go", "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, timeout=30, headers={"Authorization": "Bearer sk-alice"}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # read one token, then hang up
    wait_for(lambda: handles and handles[0].finished)
    assert handles[0].finish_reason == "cancelled" and len(handles[0].tokens) < MAX_TOKENS
    wait_for(lambda: engine.stats()["running"] == 0)
    # A non-streaming client that gives up while queued is dropped before it runs.
    engine.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", {"model": "alice", "prompt": "go", "max_tokens": 5}, timeout=0.3)
        wait_for(lambda: handles[1]._cancel, timeout=5)
    finally:
        engine.resume()
    wait_for(lambda: handles[1].finished)
    assert handles[1].finish_reason == "cancelled" and handles[1].tokens == []


def test_bad_requests_do_not_disturb_others(server, slow_decode, reference, adapters_dir, tokenizer):
    """A long request streams while bad ones arrive; it is served exactly, and so are later ones."""
    ids = [60, 61, 62, 63]
    results = {}

    def good() -> None:
        stream = client(server).completions.create(model="alice", prompt=ids, max_tokens=30, temperature=0, stream=True)
        results["good"] = "".join(ch.choices[0].text for ch in stream if ch.choices)

    worker = threading.Thread(target=good)
    worker.start()
    bad = [
        b"\xff\xfe",
        b'{"model": "alice", "prompt": [1, -5]}',
        b'{"model": "alice", "prompt": [[]]}',
        b'{"model": "alice", "prompt": "x", "max_tokens": "lots"}',
        b'{"model": 5, "messages": 3}',
        b'{"model": "alice", "prompt": "x", "stop": [""], "max_tokens": 2}',
    ]
    statuses = [post(server, "/v1/completions", body).status_code for body in bad]
    statuses.append(
        post(
            server,
            "/v1/chat/completions",
            {
                "model": "alice",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
        ).status_code
    )
    worker.join(60)
    assert statuses[:5] == [400] * 5 and statuses[5] == 200 and statuses[6] == 400, statuses
    assert results["good"] == text_of(tokenizer, reference(adapters_dir / "alice", ids, 30))
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics(server):
    client(server).completions.create(model="alice", prompt="m", max_tokens=2)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    for name in ("iapt_queue_length", "iapt_batch_size", "iapt_tokens_per_second", "iapt_generated_tokens_total"):
        assert f"\n{name} " in text, name
    assert 'iapt_requests_total{model="alice",status="200",tenant="alice"}' in text
