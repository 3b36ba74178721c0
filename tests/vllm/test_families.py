"""Mistral, Qwen2 and Gemma 3 (the other architectures the plugin registers): a mixed batch equals
IAPTModel.generate."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from iapt.vllm import IAPTServing
from tests.tiny import _COMMON, tiny_tokenizer
from tests.vllm.test_plugin import MAX_TOKENS, VOCAB, prompts, save_adapter

FAMILIES = {
    "mistral": lambda **kw: MistralForCausalLM(MistralConfig(**kw, sliding_window=None)),
    "qwen2": lambda **kw: Qwen2ForCausalLM(Qwen2Config(**kw)),
    # Text-only Gemma 3: a sliding-window layer (16 tokens, fewer than most requests hold: their late tokens no
    # longer see the slots there) and a global one; head size 32 (vLLM's CPU attention has no 12); the input
    # embedding scaled by sqrt(d) as always, and untied (tied, the sharpened head makes this tiny model repeat
    # its last token, adapter or not: equality would prove nothing)
    "gemma3": lambda **kw: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **kw,
            head_dim=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False,
        )
    ),
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
        # generators on the last layer only: layer 0 sees the slot token's own (scaled) embedding at the slots
        "carol": save_adapter(base, tmp_path / "carol", 3, bottleneck=4, num_soft_tokens=6, pooling="mean", layers=[1]),
    }
    serving = IAPTServing(tmp_path / "base", adapters)
    llm = LLM(
        **serving.engine_args(
            dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=512, seed=0
        )
    )
    names = [None, "alice", "bob", "carol", "alice"]
    batch = prompts(len(names), seed=3)
    outs = llm.generate(
        [serving.prompt(p, a) for p, a in zip(batch, names, strict=True)],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        use_tqdm=False,
    )
    del llm
    got = [list(o.outputs[0].token_ids) for o in outs]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()

    def offline(model: torch.nn.Module, p: list[int]) -> list[int]:
        out = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        return out[0, len(p) :].tolist()

    want = []
    for p, a in zip(batch, names, strict=True):
        model = reference if a is None else IAPTModel.from_pretrained(reference, adapters[a])
        want.append(offline(model, p))
        if a is not None:
            model.unload()
    assert got == want
    # The adapters matter: each differs from the bare base on its prompt (else equality would prove nothing).
    assert all(g != offline(reference, p) for g, p, a in zip(got, batch, names, strict=True) if a)
