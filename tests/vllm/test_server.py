"""The project's OpenAI server on vLLM's engine (``VLLMEngine``), through the openai client and httpx.

The tiny Llama and adapters of test_plugin.py; one engine and one server for the module. Greedy answers
equal IAPTModel.generate (and the bare base) token for token; tenancy, errors, streaming and
cancellation are the app's, on vLLM's requests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.tiny import tiny_tokenizer
from tests.vllm.servers import tiny_server
from tests.vllm.test_plugin import folders, prompts, reference  # noqa: F401  (folders: a fixture)

KEYS = """
keys:
  sk-alice: {tenant: alice, adapters: [alice]}
  sk-bob: {tenant: bob, adapters: ["bob*"], base: false}
  sk-admin: {tenant: ops, admin: true}
"""
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):  # noqa: F811
    base_dir, adapter_dirs = folders
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    with tiny_server(base_dir, adapter_dirs["alice"].parent, keys_file, KEYS) as (srv, engine):
        srv.engine = engine
        yield srv
    assert srv.stopped_engine, "the app's lifespan stops the engine"


def client(server, key: str = "sk-alice") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=60)


def post(server, path: str, body: dict[str, Any], key: str = "sk-alice") -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def text_of(tokens: list[int]) -> str:
    return tiny_tokenizer().decode(tokens, skip_special_tokens=True)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def handles(server, monkeypatch):
    """The engine handles of the requests the app submits during a test."""
    seen: list = []
    submit = server.engine.submit_many

    def recording(requests):
        out = submit(requests)
        seen.extend(out)
        return out

    monkeypatch.setattr(server.engine, "submit_many", recording)
    return seen


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each vLLM step takes ~20 ms more, so a test can act while a request runs."""
    llm = server.engine.llm
    step = llm.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(llm, "step", slow)


CASES = [
    ("tiny", "sk-alice", None),
    ("alice", "sk-alice", "alice"),
    ("bob", "sk-bob", "bob"),
    ("carol", "sk-admin", "carol"),
]


@pytest.mark.parametrize("model, key, adapter", CASES)
def test_completion_greedy_answer_equals_offline(server, folders, handles, model, key, adapter):  # noqa: F811
    base_dir, adapter_dirs = folders
    prompt = prompts(1, seed=sum(map(ord, model)))[0]
    out = client(server, key).completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    want = reference(base_dir, adapter_dirs.get(adapter) if adapter else None, prompt)
    assert handles[0].tokens == want
    assert out.choices[0].text == text_of(want)
    assert out.choices[0].finish_reason == ("stop" if len(want) < MAX_TOKENS else "length")
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(want)


@pytest.mark.parametrize("model, key, adapter", CASES[:3])
def test_chat_greedy_answer_equals_offline(server, folders, handles, model, key, adapter):  # noqa: F811
    base_dir, adapter_dirs = folders
    tokenizer = tiny_tokenizer()
    messages = [{"role": "user", "content": f"hello {model}, what now?"}]
    out = client(server, key).chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    want = reference(base_dir, adapter_dirs.get(adapter) if adapter else None, ids)
    assert handles[0].tokens == want
    assert out.choices[0].message.content == text_of(want)


def test_many_prompts_and_n_in_one_call(server, folders, handles):  # noqa: F811
    """Several prompts, n=2 each: every choice is its prompt's greedy answer (vLLM batches them together)."""
    base_dir, adapter_dirs = folders
    batch = prompts(3, seed=21)
    out = client(server, "sk-admin").completions.create(
        model="carol", prompt=batch, max_tokens=MAX_TOKENS, temperature=0, n=2
    )
    want = [reference(base_dir, adapter_dirs["carol"], p) for p in batch for _ in range(2)]
    assert [h.tokens for h in handles] == want
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [text_of(w) for w in want]


def test_another_tenants_adapter_is_not_found(server):
    for model, key in (("bob", "sk-alice"), ("alice", "sk-bob"), ("tiny", "sk-bob"), ("mallory", "sk-admin")):
        r = post(server, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}, key)
        assert r.status_code == 404, (model, key)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
        assert model in error["message"]
    listed = [m.id for m in client(server, "sk-alice").models.list().data]
    assert listed == ["tiny", "alice"]


def test_streaming_gives_the_same_answer(server, folders):  # noqa: F811
    base_dir, adapter_dirs = folders
    prompt = prompts(1, seed=33)[0]
    want = text_of(reference(base_dir, adapter_dirs["alice"], prompt))
    stream = client(server).completions.create(
        model="alice", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = client(server).chat.completions.create(
        model="alice", messages=[{"role": "user", "content": "stream me"}], max_tokens=MAX_TOKENS, temperature=0
    )
    streamed = client(server).chat.completions.create(
        model="alice",
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_stop_strings_and_limits_are_the_apps(server, folders):  # noqa: F811
    base_dir, adapter_dirs = folders
    prompt = prompts(1, seed=44)[0]
    full = text_of(reference(base_dir, adapter_dirs["alice"], prompt, max_tokens=MAX_TOKENS))
    assert len(full) >= 3
    out = client(server).completions.create(
        model="alice", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[full[2]]
    )
    assert out.choices[0].text == full[: full.index(full[2])] and out.choices[0].finish_reason == "stop"
    r = post(server, "/v1/completions", {"model": "alice", "prompt": "x" * 70, "max_tokens": 2})
    assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "alice", "prompt": "x", "max_tokens": 101})
    assert r.status_code == 400 and "limit of 100" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [0, 5, 6], "max_tokens": 2})  # the marker
    assert r.status_code == 400 and "IAPT marker" in r.json()["error"]["message"]


def test_sampling_parameters_and_logprobs_reach_vllm(server):
    body = {
        "model": "alice",
        "prompt": "abc",
        "max_tokens": 6,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 7,
        "repetition_penalty": 1.2,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "logprobs": 3,
        "ignore_eos": True,
    }
    first, again = post(server, "/v1/completions", body).json(), post(server, "/v1/completions", body).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"], "a seed gives the same sample"
    assert first["usage"]["completion_tokens"] == 6 and first["choices"][0]["finish_reason"] == "length"
    last = {**body, "seed": -1}  # an API seed that vLLM itself reads as "no seed"
    assert (
        post(server, "/v1/completions", last).json()["choices"]
        == post(server, "/v1/completions", last).json()["choices"]
    )
    lp = first["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(3 <= len(top) <= 4 for top in lp["top_logprobs"])
    greedy = post(server, "/v1/completions", {**body, "temperature": 0, "logprobs": 1}).json()
    lp = greedy["choices"][0]["logprobs"]
    # greedy without penalties would take the most likely token; with them the top-1 entry is still listed
    assert all(len(top) in (1, 2) for top in lp["top_logprobs"])


def test_a_disconnected_client_is_aborted_in_vllm(server, slow_steps, handles):
    engine = server.engine
    body = {"model": "alice", "prompt": "go", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, timeout=60, headers={"Authorization": "Bearer sk-alice"}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["text"]:
                break  # one token, then hang up
    wait_for(lambda: bool(handles) and handles[0].finished)
    assert handles[0].finish_reason == "cancelled" and len(handles[0].tokens) < 100
    wait_for(lambda: engine.llm.get_num_unfinished_requests() == 0)
    assert engine.stats()["running"] == 0
    # A non-streaming client that gives up while its request waits: dropped before it reaches vLLM.
    engine.pause()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                json={"model": "alice", "prompt": "go", "max_tokens": 5},
                headers={"Authorization": "Bearer sk-alice"},
                timeout=0.3,
            )
        wait_for(lambda: len(handles) > 1 and handles[1]._cancel, timeout=5)
    finally:
        engine.resume()
    wait_for(lambda: handles[1].finished)
    assert handles[1].finish_reason == "cancelled" and handles[1].tokens == []


def test_a_full_queue_answers_429(server):
    engine = server.engine
    engine.pause()
    try:
        from iapt.serving.requests import Request

        held = engine.submit_many([Request([5, 6], "alice", max_tokens=1) for _ in range(engine.max_queue)])
        r = post(server, "/v1/completions", {"model": "alice", "prompt": "q", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        engine.resume()
    for h in held:
        h.wait(60)
    assert all(h.finish_reason in ("stop", "length") for h in held)


def test_runtime_adapter_load_and_unload_keep_the_error_shapes(server, folders):  # noqa: F811
    """Loading and unloading at run time (tests/vllm/test_runtime.py has the answers); the app's error shapes."""
    _, adapter_dirs = folders
    body = {"lora_name": "dave", "lora_path": str(adapter_dirs["alice"])}
    assert post(server, "/v1/load_lora_adapter", body, "sk-alice").status_code == 403
    r = post(server, "/v1/load_lora_adapter", body, "sk-admin")
    assert r.status_code == 200 and r.json() == {"status": "loaded", "name": "dave"}
    r = post(server, "/v1/load_lora_adapter", body, "sk-admin")
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "dave"}, "sk-admin")
    assert r.status_code == 200 and r.json() == {"status": "unloaded", "name": "dave"}
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "zed"}, "sk-admin")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_tokenize_health_and_metrics(server):
    r = post(server, "/tokenize", {"model": "alice", "prompt": "abc"})
    assert r.status_code == 200 and r.json()["max_model_len"] == 128 - 4  # alice's 4 slots
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    assert "iapt_generated_tokens_total" in metrics and "iapt_adapters_loaded 3.0" in metrics


def test_bad_adapters_are_skipped_like_the_builtin_engine(folders, tmp_path):  # noqa: F811
    """Checked before vLLM starts: a folder that is no adapter is skipped (load_errors); too few slots refused."""
    from iapt.vllm.engine import VLLMEngine

    base_dir, adapter_dirs = folders
    (tmp_path / "junk").mkdir()
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.model_path, engine.base_names, engine.load_errors = str(base_dir), {"tiny"}, {}
    engine.max_bottleneck, engine.max_soft_tokens = 512, 64
    read = engine._read_adapters(tmp_path, {"alice": adapter_dirs["alice"]})
    assert list(read) == ["alice"] and "junk" in engine.load_errors
    engine.max_soft_tokens = 3
    with pytest.raises(ValueError, match="soft tokens"):
        engine._read_adapters(None, {"alice": adapter_dirs["alice"]})
    assert isinstance(read["alice"].path, Path)


def test_a_dead_vllm_engine_fails_its_requests_and_stops():
    """vLLM's engine core gone (EngineDeadError): running requests fail, the loop stops (/health answers 503),
    and new requests get 503. A stand-in for vLLM's engine, no model."""
    from iapt.serving.protocol import APIError
    from iapt.serving.requests import Request
    from iapt.vllm.engine import VLLMEngine

    class EngineDeadError(Exception):
        pass

    class Dead:
        def add_request(self, *args: object, **kwargs: object) -> None:
            pass

        def abort_request(self, ids: list[str]) -> None:
            pass

        def step(self) -> list:
            raise EngineDeadError("the engine core died")

    engine = VLLMEngine.__new__(VLLMEngine)
    engine._init_state()
    engine.llm, engine.max_queue, engine._prepare = Dead(), 4, lambda r: ({}, None, None)  # type: ignore[method-assign]
    engine.start()
    handle = engine.submit_many([Request([5, 6])])[0]
    handle.wait(10)
    assert handle.finish_reason == "error" and "the engine core died" in (handle.error or "")
    wait_for(lambda: not engine.is_running)
    with pytest.raises(APIError) as info:
        engine.submit_many([Request([5, 6])])
    assert info.value.status == 503 and "restart the server" in str(info.value)
