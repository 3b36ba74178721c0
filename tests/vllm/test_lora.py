"""LoRA tenants in the same vLLM engine as IAPT tenants (vLLM's own multi-LoRA, ``VLLMEngine``).

The tiny Llama and IAPT adapters of test_plugin.py, plus PEFT LoRA adapters saved as ``iapt train --method lora``
saves them (``build_lora``: q_proj and v_proj, rank 8) and one on every projection at rank 16 (vLLM packs
q/k/v and gate/up). Up-projections (LoRA's B) are random, so each adapter changes the base's answers. One
engine and one server for the module: greedy answers equal PEFT's ``generate`` of each adapter alone, token
for token, and the tokens' logprobs PEFT's within LOGPROB_TOL (vLLM's CPU LoRA path computes in float32 too,
in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import LlamaForCausalLM

from iapt.serving.requests import Request
from tests.tiny import make_base
from tests.vllm.servers import tiny_server
from tests.vllm.test_plugin import folders, prompts, reference  # noqa: F401  (folders: a fixture)

MAX_TOKENS = 8
LOGPROB_TOL = 1e-4
KEYS = """
keys:
  sk-alice: {tenant: alice, adapters: [alice, lo]}
  sk-admin: {tenant: ops, admin: true}
"""


def save_lora(base: torch.nn.Module, path: Path, seed: int, rank: int = 8, targets: list[str] | None = None) -> Path:
    """A LoRA adapter folder as ``iapt train --method lora`` writes it, with random B (trained-looking)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from iapt.baselines.peft_methods import build_lora

    torch.manual_seed(seed)
    if targets is None:
        model = build_lora(base, rank).peft_model
    else:
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank, target_modules=targets)
        model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tenants(folders, tmp_path_factory):  # noqa: F811
    """The adapters folder: IAPT alice and carol, LoRA lo (q/v, r=8) and wide (every projection, r=16), and three
    LoRA folders vLLM cannot serve: another base's, one on the LM head, one with DoRA."""
    from tests.vllm.test_plugin import tiny_base

    base_dir, iapt_dirs = folders
    root = tmp_path_factory.mktemp("lora") / "adapters"
    for name in ("alice", "carol"):
        shutil.copytree(iapt_dirs[name], root / name)
    good = {
        "lo": save_lora(tiny_base(), root / "lo", seed=11),
        "wide": save_lora(
            tiny_base(),
            root / "wide",
            seed=12,
            rank=16,
            targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    }
    save_lora(make_base("llama"), root / "otherbase", seed=13)  # hidden size 48, this base has 64
    save_lora(tiny_base(), root / "head", seed=14, targets=["q_proj", "lm_head"])
    shutil.copytree(good["lo"], root / "dora")
    config = json.loads((root / "dora" / "adapter_config.json").read_text())
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return base_dir, root, good


@pytest.fixture(scope="module")
def server(tenants, tmp_path_factory):
    base_dir, root, _ = tenants
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    with tiny_server(base_dir, root, keys_file, KEYS) as (srv, engine):
        srv.engine = engine
        yield srv


def peft_reference(base_dir: Path, lora_dir: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    """PEFT's greedy generate of one request alone, and each generated token's log-probability."""
    from peft import PeftModel

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, lora_dir).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[0]
    with torch.no_grad():
        logits = model(out[None, :-1]).logits[0].float().log_softmax(-1)
    new = out[len(prompt) :]
    chosen = logits[len(prompt) - 1 :].gather(-1, new[:, None])[:, 0]
    return new.tolist(), chosen.tolist()


def test_lora_tenants_are_served_and_bad_folders_reported(server):
    engine = server.engine
    assert {n: a.kind for n, a in engine.adapters.items()} == {
        "alice": "IAPT",
        "carol": "IAPT",
        "lo": "LORA",
        "wide": "LORA",
    }
    assert engine.lora_enabled and engine.max_lora_rank == 16  # wide's rank, a value vLLM accepts
    errors = engine.load_errors
    assert set(errors) == {"otherbase", "head", "dora"}
    assert "trained on another base model" in errors["otherbase"]
    assert "'lm_head'" in errors["head"] and "vLLM applies LoRA to" in errors["head"]
    assert "DoRA" in errors["dora"]


@pytest.mark.parametrize("name", ["lo", "wide"])
def test_lora_greedy_answer_equals_peft(server, tenants, name):
    base_dir, _, good = tenants
    engine = server.engine
    for prompt in prompts(2, seed=len(name)):
        handle = engine.submit(Request(prompt, name, max_tokens=MAX_TOKENS, logprobs=0)).wait(60)
        tokens, logprobs = peft_reference(base_dir, good[name], prompt)
        assert handle.tokens == tokens
        assert handle.tokens != reference(base_dir, None, prompt)  # the adapter changes the answer
        got = [lp.logprob for lp in handle.logprobs]
        assert max(abs(a - b) for a, b in zip(got, logprobs, strict=True)) < LOGPROB_TOL


def test_a_batch_mixing_base_iapt_and_lora_gives_each_its_own_answer(server, tenants, folders):  # noqa: F811
    base_dir, _, good = tenants
    _, iapt_dirs = folders
    engine = server.engine
    batch = prompts(6, seed=5)
    names = [None, "alice", "lo", "carol", "wide", "lo"]
    engine.pause()  # all six are added in one engine step: vLLM schedules them in one batch
    try:
        handles = engine.submit_many([Request(p, n, max_tokens=MAX_TOKENS) for p, n in zip(batch, names, strict=True)])
    finally:
        engine.resume()
    for h, p, n in zip(handles, batch, names, strict=True):
        h.wait(60)
        if n in good:
            want = peft_reference(base_dir, good[n], p)[0]
        else:
            want = reference(base_dir, iapt_dirs[n] if n else None, p)
        assert h.tokens == want, n


def test_http_serves_a_lora_and_an_iapt_tenant_by_name(server, tenants, folders):  # noqa: F811
    base_dir, _, good = tenants
    _, iapt_dirs = folders
    client = openai.OpenAI(api_key="sk-alice", base_url=server.url + "/v1", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny", "alice", "lo"]
    tokenizer = server.engine.tokenizer
    for model, want_of in [
        ("lo", lambda ids: peft_reference(base_dir, good["lo"], ids)[0]),
        ("alice", lambda ids: reference(base_dir, iapt_dirs["alice"], ids)),
    ]:
        out = client.completions.create(model=model, prompt=f"hi {model}", max_tokens=MAX_TOKENS, temperature=0)
        want = want_of(tokenizer(f"hi {model}", add_special_tokens=False).input_ids)
        assert out.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    # Another tenant's LoRA adapter: 404, as for an IAPT adapter.
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": "wide", "prompt": "x", "max_tokens": 2},
        headers={"Authorization": "Bearer sk-alice"},
        timeout=60,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(
        server.url + "/tokenize",
        json={"model": "lo", "prompt": "abc"},
        headers={"Authorization": "Bearer sk-alice"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["max_model_len"] == 128  # no slots


def test_an_explicit_bad_lora_adapter_stops_the_start(tenants):
    from iapt.vllm.engine import VLLMEngine

    base_dir, root, _ = tenants
    with pytest.raises(ValueError, match="trained on another base model"):
        VLLMEngine(base_dir, adapters={"x": root / "otherbase"}, max_model_len=128)
