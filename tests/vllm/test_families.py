"""Mistral and Qwen2 (the other architectures the plugin registers): a mixed batch equals IAPTModel.generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from iapt.vllm import IAPTServing
from tests.tiny import _COMMON, tiny_tokenizer
from tests.vllm.test_plugin import MAX_TOKENS, VOCAB, prompts, save_adapter

FAMILIES = {
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**kw, sliding_window=None)),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**kw)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_mixed_batch_equals_offline_generate(family, tmp_path):
    from vllm import LLM, SamplingParams

    from iapt import IAPTModel

    torch.manual_seed(0)
    base = FAMILIES[family](
        **{
            **_COMMON,
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    ).eval()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(8.0)
        base.get_input_embeddings().weight[0].normal_()
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapters = {
        "alice": save_adapter(base, tmp_path / "alice", 1, bottleneck=8),
        "bob": save_adapter(base, tmp_path / "bob", 2, bottleneck=4, anchor="none"),
    }
    serving = IAPTServing(tmp_path / "base", adapters)
    llm = LLM(
        **serving.engine_args(
            dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=512, seed=0
        )
    )
    names = [None, "alice", "bob", "alice"]
    batch = prompts(len(names), seed=3)
    outs = llm.generate(
        [serving.prompt(p, a) for p, a in zip(batch, names, strict=True)],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    del llm
    got = [list(o.outputs[0].token_ids) for o in outs]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    want = []
    for p, a in zip(batch, names, strict=True):
        model = reference if a is None else IAPTModel.from_pretrained(reference, adapters[a])
        want.append(
            model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
        )
        if a is not None:
            model.unload()
    assert got == want
