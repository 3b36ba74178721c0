"""The plugin on the real packaged model (SmolLM2-135M-Instruct, float32): greedy tokens equal IAPTModel.generate."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a colour.", "Write one word that rhymes with cat, please."]
MAX_TOKENS = 12


def test_real_model_mixed_batch_equals_offline_generate(tmp_path):
    from vllm import LLM, SamplingParams

    from iapt import IAPTModel
    from iapt.data import encode_prompt
    from iapt.vllm import IAPTServing
    from tests.vllm.servers import packaged_model_with_adapter

    model, tokenizer = packaged_model_with_adapter(tmp_path / "base", tmp_path / "adapter")

    serving = IAPTServing(tmp_path / "base", {"demo": tmp_path / "adapter"})
    prompts = [encode_prompt(tokenizer, p).input_ids for p in PROMPTS]
    names = ["demo", None, "demo", "demo"]
    batch = [prompts[0], prompts[1], prompts[1], prompts[2]]
    llm = LLM(
        **serving.engine_args(
            dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=1024, seed=0
        )
    )
    outs = llm.generate(
        [serving.prompt(p, a) for p, a in zip(batch, names, strict=True)],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    del llm
    got = [list(o.outputs[0].token_ids) for o in outs]
    offline = IAPTModel.from_pretrained(model.eval(), tmp_path / "adapter")
    want = []
    for p, a in zip(batch, names, strict=True):
        kwargs = {"max_new_tokens": MAX_TOKENS, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        ids = torch.tensor([p])
        if a is None:
            with offline.disable_adapter():
                out = offline.generate(ids, **kwargs)
        else:
            out = offline.generate(ids, **kwargs)
        want.append(out[0, len(p) :].tolist())
    assert got == want
    assert got[1] != got[2], "the adapter was meant to change the base's answer to the same prompt"
