"""Loading and unloading adapters while the vLLM engine runs (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).

The tiny Llama and adapters of test_plugin.py and test_lora.py. The server starts with IAPT alice and LoRA lo
(so vLLM's LoRA is on); bob and carol (IAPT) and lo2 (LoRA) are loaded at run time, and their greedy answers
equal IAPTModel.generate / PEFT's generate. An unloaded name answers 404 as with the built-in engine, a freed
header index is reused, an adapter with requests in flight is not unloaded (409), and a bad folder answers 400
while the other tenants keep being served.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import httpx
import pytest

from iapt.serving.requests import Request
from tests.tiny import tiny_tokenizer
from tests.vllm.servers import tiny_server
from tests.vllm.test_lora import peft_reference, save_lora
from tests.vllm.test_plugin import folders, prompts, reference, tiny_base  # noqa: F401  (folders: a fixture)

MAX_TOKENS = 8
KEYS = """
keys:
  sk-admin: {tenant: ops, admin: true}
"""


@pytest.fixture(scope="module")
def setup(folders, tmp_path_factory):  # noqa: F811
    base_dir, iapt_dirs = folders
    root = tmp_path_factory.mktemp("runtime")
    shutil.copytree(iapt_dirs["alice"], root / "adapters" / "alice")
    save_lora(tiny_base(), root / "adapters" / "lo", seed=21)
    extra = {
        "lo2": save_lora(tiny_base(), root / "lo2", seed=22),
        "big": save_lora(tiny_base(), root / "big", seed=23, rank=32, targets=["q_proj"]),
    }
    with tiny_server(base_dir, root / "adapters", root / "keys.yaml", KEYS) as (srv, engine):
        yield srv, engine, base_dir, {**iapt_dirs, **extra}


def post(srv: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers={"Authorization": "Bearer sk-admin"}, timeout=120)


def complete(srv: Any, model: str, prompt: list[int]) -> httpx.Response:
    return post(srv, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})


def answer(srv: Any, model: str, prompt: list[int]) -> str:
    r = complete(srv, model, prompt)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def text(tokens: list[int]) -> str:
    return tiny_tokenizer().decode(tokens, skip_special_tokens=True)


def ids(prompt_seed: int) -> list[int]:
    return prompts(1, seed=prompt_seed)[0]


def test_an_iapt_adapter_loaded_at_run_time_answers_as_offline(setup):
    srv, engine, base_dir, dirs = setup
    for name in ("bob", "carol"):  # 6 slots after a sink column, mean pooling on one layer; the zero start
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(dirs[name])})
        assert r.status_code == 200 and r.json() == {"status": "loaded", "name": name}
    assert engine.llm.collective_rpc("iapt_adapters")[0] == {i: n for n, i in engine.serving.index.items()}
    for name in ("bob", "carol", "alice"):
        prompt = ids(len(name))
        assert answer(srv, name, prompt) == text(reference(base_dir, dirs[name], prompt)), name
    models = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sk-admin"}).json()["data"]
    assert {"alice", "bob", "carol", "lo"} <= {m["id"] for m in models}


def test_a_lora_adapter_loaded_at_run_time_answers_as_peft(setup):
    srv, engine, base_dir, dirs = setup
    assert post(srv, "/v1/load_lora_adapter", {"lora_name": "lo2", "lora_path": str(dirs["lo2"])}).status_code == 200
    assert engine.adapters["lo2"].kind == "LORA"
    prompt = ids(7)
    assert answer(srv, "lo2", prompt) == text(peft_reference(base_dir, dirs["lo2"], prompt)[0])
    # Above the rank the engine was started with (lo's 8: max_lora_rank 8): refused, naming the fix.
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(dirs["big"])})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]


def test_unloaded_names_are_unknown_and_a_freed_index_is_reused(setup):
    srv, engine, base_dir, dirs = setup
    if "bob" not in engine.adapters:
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": "bob", "lora_path": str(dirs["bob"])})
        assert r.status_code == 200
    index = engine.serving.index["bob"]
    for name in ("bob", "lo2"):
        if name not in engine.adapters:
            continue
        r = post(srv, "/v1/unload_lora_adapter", {"lora_name": name})
        assert r.status_code == 200 and r.json() == {"status": "unloaded", "name": name}
        r = complete(srv, name, [5, 6])
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = post(srv, "/v1/unload_lora_adapter", {"lora_name": name})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "dave", "lora_path": str(dirs["carol"])})
    assert r.status_code == 200 and engine.serving.index["dave"] == index  # bob's index, free again
    assert engine.llm.collective_rpc("iapt_adapters")[0] == {i: n for n, i in engine.serving.index.items()}
    prompt = ids(3)
    assert answer(srv, "dave", prompt) == text(reference(base_dir, dirs["carol"], prompt))


def test_an_adapter_with_requests_in_flight_is_not_unloaded(setup):
    srv, engine, base_dir, dirs = setup
    engine.pause()  # the request stays queued; run-time loads and unloads still run between steps
    try:
        held = engine.submit_many([Request([5, 6, 7], "lo", max_tokens=2), Request([5, 6, 7], "alice", max_tokens=2)])
        for name in ("lo", "alice"):
            r = post(srv, "/v1/unload_lora_adapter", {"lora_name": name})
            assert r.status_code == 409 and "queued or running" in r.json()["error"]["message"], r.text
    finally:
        engine.resume()
    for h in held:
        assert h.wait(60).finish_reason in ("stop", "length")
    assert "lo" in engine.adapters and "alice" in engine.adapters


def test_an_adapter_with_a_request_decoding_is_not_unloaded(setup, monkeypatch):
    srv, engine, _, _ = setup
    step = engine.llm.step

    def slow() -> Any:
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine.llm, "step", slow)
    for name in ("lo", "alice"):
        h = engine.submit(Request([5, 6, 7], name, max_tokens=90, ignore_eos=True))
        deadline = time.monotonic() + 30
        while not h.tokens:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = post(srv, "/v1/unload_lora_adapter", {"lora_name": name})
        assert r.status_code == 409 and not h.finished, r.text
        h.cancel()
        assert h.wait(30).finish_reason == "cancelled"


def test_a_bad_folder_answers_400_and_the_others_keep_serving(setup, tmp_path):
    srv, engine, base_dir, dirs = setup
    from tests.tiny import make_base

    other = save_lora(make_base("llama"), tmp_path / "other", seed=5)  # another base's LoRA
    cases = {
        str(tmp_path / "missing"): "no adapter at",
        str(other): "trained on another base model",
    }
    for path, message in cases.items():
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    r = post(srv, "/v1/load_lora_adapter", {"lora_name": "alice", "lora_path": str(dirs["bob"])})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert "bad" not in engine.adapters
    prompt = ids(11)
    assert answer(srv, "alice", prompt) == text(reference(base_dir, dirs["alice"], prompt))
    assert answer(srv, "tiny", prompt) == text(reference(base_dir, None, prompt))


def test_the_header_frees_and_reuses_indices():
    from iapt.vllm.protocol import Header

    header = Header(0, 100, [4, 6])
    freed = header.with_slots(1, 0)
    with pytest.raises(ValueError, match="no adapter at index 1"):
        freed.encode([5, 6], 1)
    with pytest.raises(ValueError, match="unloaded"):
        freed.decode([0, 1, 0, 2, 5, 6])
    assert freed.free_index() == 1 and freed.with_slots(1, 5).num_slots == [5, 6]
    assert header.with_slots(2, 0).num_slots == [4] and header.free_index() == 3
    with pytest.raises(ValueError, match="at least 4"):
        header.with_slots(3, 2)
