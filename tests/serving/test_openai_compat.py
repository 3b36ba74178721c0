"""vLLM's OpenAI-server surface: --api-key, the LoRA endpoints, /tokenize, /detokenize, /version,
GET /v1/models/{model}, sampling parameters and logprobs over HTTP, and 400 for fields the server cannot honour."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import iapt
from iapt.serving import Engine, create_app
from iapt.serving.app import BackgroundServer
from iapt.serving.auth import KeyRing
from tests.serving.test_app import KEYS, chat_ids, client, post, text_of
from tests.tiny import tiny_lm

torch.set_num_threads(1)
ROOT = "sk-root"  # --api-key


@pytest.fixture(scope="module")
def server(adapters_dir, tokenizer, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(KEYS)
    engine = Engine(tiny_lm().eval(), tokenizer, adapters_dir, base_name="tiny", max_batch_size=8, max_queue=16)
    app = create_app(engine, KeyRing.from_file(keys_file), max_prompt_tokens=60, max_tokens_limit=40, api_key=ROOT)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv
    engine.close()


@pytest.fixture(scope="module")
def offline():
    return tiny_lm().eval()


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def raw_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the offline model's logits at each generated position ``(len(tokens), V)``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


# ------------------------------------------------------------------------------------------ keys, models
def test_api_key_has_access_to_everything_beside_the_keys_file(server):
    root = client(server, ROOT)
    assert {m.id for m in root.models.list()} == {"tiny", "alice", "bob", "carol"}
    assert root.completions.create(model="carol", prompt="x", max_tokens=2).choices
    assert httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ROOT}"}).status_code == 200
    assert [m.id for m in client(server).models.list()] == ["tiny", "alice"]  # the keys file's keys still work
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-roo").models.list()
    ring = KeyRing(None).with_api_key("k")
    assert not ring.open and ring.authenticate("Bearer k").admin and ring.authenticate("Bearer x") is None
    for bad in ("", " k", "k"):  # blank, unsendable, or already a key
        with pytest.raises(ValueError, match="--api-key"):
            ring.with_api_key(bad)


def test_retrieve_one_model(server):
    alice = client(server)
    card = alice.models.retrieve("alice")
    assert (card.id, card.object, card.owned_by) == ("alice", "model", "iapt") and card.parent == "tiny"
    assert alice.models.retrieve("tiny").parent is None
    for key, model in (("sk-alice", "bob"), ("sk-alice", "nobody"), ("sk-bob", "tiny")):
        r = httpx.get(f"{server.url}/v1/models/{model}", headers={"Authorization": f"Bearer {key}"})
        err = error_of(r, 404)
        assert err["message"] == f"The model `{model}` does not exist or you do not have access to it."
        assert err["code"] == "model_not_found"
        completion = error_of(post(server, "/v1/completions", {"model": model, "prompt": "x"}, key=key), 404)
        assert completion == err  # the same answer as every other 404 for a model
    error_of(httpx.get(server.url + "/v1/models/alice"), 401)


def test_lora_adapter_endpoints(server, adapters_dir, wrong_base_adapter, reference, tokenizer):
    body = {"lora_name": "bob-lora", "lora_path": str(adapters_dir / "carol")}
    assert error_of(post(server, "/v1/load_lora_adapter", body, key="sk-bob"), 403)["type"] == "permission_error"
    r = post(server, "/v1/load_lora_adapter", body, key=ROOT)
    assert r.status_code == 200 and r.json() == {"status": "loaded", "name": "bob-lora"}
    assert "already loaded" in error_of(post(server, "/v1/load_lora_adapter", body, key=ROOT), 400)["message"]
    wrong = {"lora_name": "mallory", "lora_path": str(wrong_base_adapter)}
    refused = error_of(post(server, "/v1/load_lora_adapter", wrong, key="sk-admin"), 400)
    assert "trained on a base" in refused["message"]
    bob = client(server, "sk-bob")
    out = bob.completions.create(model="bob-lora", prompt=[50, 51, 52], max_tokens=6, temperature=0)
    assert out.choices[0].text == text_of(tokenizer, reference(adapters_dir / "carol", [50, 51, 52], 6))
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "bob-lora"}, key="sk-admin").json() == {
        "status": "unloaded",
        "name": "bob-lora",
    }
    error_of(post(server, "/v1/unload_lora_adapter", {"lora_name": "bob-lora"}, key=ROOT), 404)
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model="bob-lora", prompt="x", max_tokens=2)


# ------------------------------------------------------------------------------------------ tokenize
def test_tokenize_and_detokenize(server, tokenizer):
    r = post(server, "/tokenize", {"model": "tiny", "prompt": "Hello"})
    ids = tokenizer("Hello").input_ids
    assert r.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None}
    r = post(
        server, "/tokenize", {"model": "alice", "prompt": "Hi", "add_special_tokens": False, "return_token_strs": True}
    )
    assert r.json() == {
        "count": 2,
        "max_model_len": 128 - 4,
        "tokens": tokenizer("Hi", add_special_tokens=False).input_ids,
        "token_strs": ["H", "i"],
    }  # alice's 4 soft tokens take context positions
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = post(server, "/tokenize", {"model": "alice", "messages": messages})
    chat = client(server).chat.completions.create(model="alice", messages=messages, max_tokens=2)
    assert r.json()["tokens"] == chat_ids(tokenizer, messages)
    assert r.json()["count"] == chat.usage.prompt_tokens
    no_prompt = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < r.json()["count"]
    assert post(server, "/detokenize", {"model": "alice", "tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    assert "vocabulary" in error_of(post(server, "/detokenize", {"tokens": [5, 100]}), 400)["message"]
    for path, body in (
        ("/tokenize", {"model": "bob", "prompt": "x"}),
        ("/detokenize", {"model": "bob", "tokens": [5]}),
    ):
        assert error_of(post(server, path, body), 404)["code"] == "model_not_found"
        error_of(post(server, path, body, key=None), 401)
    assert "`prompt`" in error_of(post(server, "/tokenize", {"prompt": "x", "messages": messages}), 400)["message"]


def test_version_is_open(server):
    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json() == {"version": iapt.__version__}


# ------------------------------------------------------------------------------------------ fields
@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "auto"),
        ("/v1/chat/completions", "functions", [{"name": "f"}]),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "logit_bias", {"5": 10}),
        ("/v1/completions", "logit_bias", {"5": 10}),
        ("/v1/completions", "suffix", "!"),
        ("/v1/completions", "min_p", 0.1),
    ],
)
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(server, path, field, value):
    body = {"model": "alice", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    err = error_of(post(server, path, {**body, field: value}), 400)
    assert err["param"] == field and f"`{field}` is not supported" in err["message"]
    assert post(server, path, {**body, field: None}).status_code == 200  # null is "not used"


def test_nested_unsupported_fields_and_content_parts_are_named(server):
    chat = {"model": "alice", "max_tokens": 2}
    err = error_of(
        post(
            server,
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
        ),
        400,
    )
    assert err["param"] == "messages.0.tool_calls"
    err = error_of(
        post(
            server,
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        ),
        400,
    )
    assert "messages.0.content.0.type" in err["message"] and "'text'" in err["message"]
    ok = post(
        server,
        "/v1/chat/completions",
        {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}]},
    )
    assert ok.status_code == 200, ok.text
    err = error_of(
        post(
            server,
            "/v1/completions",
            {"model": "alice", "prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}},
        ),
        400,
    )
    assert err["param"] == "stream_options.continuous_usage_stats"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -2),
        ("top_k", 1.5),
        ("repetition_penalty", 0),
        ("repetition_penalty", 11),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -3),
        ("presence_penalty", 2.5),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_out_of_range_sampling_parameters_answer_400(server, field, value):
    err = error_of(post(server, "/v1/completions", {"model": "alice", "prompt": "x", field: value}), 400)
    assert err["param"] == field and field in err["message"]


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_parameters_over_http(server, offline, tokenizer):
    c = client(server)
    ids = [40, 41, 42, 43, 44]
    kwargs = {"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0}
    greedy = c.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text
    neutral = c.completions.create(
        **kwargs,
        frequency_penalty=0,
        presence_penalty=0,
        extra_body={"ignore_eos": True, "top_k": -1, "repetition_penalty": 1.0},
    )
    assert neutral.choices[0].text == greedy
    top1 = c.completions.create(**{**kwargs, "temperature": 1.0}, seed=3, extra_body={"ignore_eos": True, "top_k": 1})
    assert top1.choices[0].text == greedy
    rep = c.completions.create(**kwargs, extra_body={"ignore_eos": True, "repetition_penalty": 2.0})
    hf = offline.generate(
        torch.tensor([ids]),
        max_new_tokens=16,
        do_sample=False,
        repetition_penalty=2.0,
        pad_token_id=0,
        eos_token_id=None,
    )[0, len(ids) :].tolist()
    assert rep.choices[0].text == text_of(tokenizer, hf) != greedy
    presence = c.completions.create(**kwargs, presence_penalty=2.0, extra_body={"ignore_eos": True}).choices[0].text
    assert presence != greedy and len(set(presence)) > len(set(greedy))


# ------------------------------------------------------------------------------------------ logprobs
def test_completion_logprobs_equal_the_offline_model(server, offline, tokenizer):
    ids = [40, 41, 42, 43, 44]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    tokens = tokenizer(choice["text"], add_special_tokens=False).input_ids  # one character, one token
    expected = raw_logprobs(offline, ids, tokens)
    assert lp["tokens"] == [tokenizer.decode([t]) for t in tokens]
    assert lp["token_logprobs"] == pytest.approx(
        expected.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), abs=1e-4
    )
    assert lp["text_offset"] == list(range(len(tokens)))
    for step, top in enumerate(lp["top_logprobs"]):
        best = expected[step].topk(2)
        want = {tokenizer.decode([t]): v for t, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)}
        assert set(top) == set(want) | {lp["tokens"][step]} and len(top) <= 3
        for token, value in want.items():
            assert top[token] == pytest.approx(value, abs=1e-4)
    # Streaming: the chunks' logprobs, joined, are the same.
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={**body, "stream": True},
        timeout=30,
        headers={"Authorization": "Bearer sk-alice"},
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    for k in streamed:
                        streamed[k] += c["logprobs"][k]
    assert streamed == lp
    # A stop string: logprobs of the tokens up to it, not past it.
    cut = post(server, "/v1/completions", {**body, "stop": [choice["text"][3:5]]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["logprobs"]["tokens"] == lp["tokens"][:5]


def test_chat_logprobs_through_the_openai_client(server, offline, tokenizer):
    c = client(server, ROOT)
    messages = [{"role": "user", "content": "Name a colour."}]
    out = c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    tokens = [tokenizer.convert_tokens_to_ids(e.token) for e in content]
    assert "".join(e.token for e in content) == out.choices[0].message.content
    expected = raw_logprobs(offline, chat_ids(tokenizer, messages), tokens)
    for step, entry in enumerate(content):
        assert entry.logprob == pytest.approx(float(expected[step, tokens[step]]), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        best = expected[step].topk(3)
        assert [tokenizer.convert_tokens_to_ids(t.token) for t in entry.top_logprobs] == best.indices.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    streamed = []
    for chunk in c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert c.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None
    err = error_of(
        post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages, "top_logprobs": 2}), 400
    )
    assert err["param"] == "top_logprobs" and "logprobs: true" in err["message"]
