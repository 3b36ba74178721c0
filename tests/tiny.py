"""Tiny decoder-only models built in code, one per supported family (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(**_COMMON))


def _qwen2() -> torch.nn.Module:
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON))


def _mistral() -> torch.nn.Module:
    return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None))


def _gemma3() -> torch.nn.Module:
    cfg = Gemma3TextConfig(
        **_COMMON, head_dim=12, sliding_window=64, layer_types=["sliding_attention", "full_attention"]
    )
    return Gemma3ForCausalLM(cfg)


def _gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma3": _gemma3, "gpt2": _gpt2}


def make_base(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    # Random tiny models put near-ties in the logits; sharpen them so greedy decoding is stable
    # against float noise and the equivalence tests compare behaviour, not rounding.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Three prompts of lengths 7, 4, 9, left-padded with the pad id; also the rows alone."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 9)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask, rows


CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def tiny_tokenizer():
    """A character-level tokenizer (100 ids) with a ChatML-like template, built in code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def tiny_lm(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny model whose vocabulary fits ``tiny_tokenizer``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{**_COMMON, "vocab_size": 104, "hidden_size": 32, "intermediate_size": 64, "initializer_range": 0.2}
    )  # sharper than the default: a backbone prompts can steer
    return LlamaForCausalLM(cfg)


def served_like_offline(
    base: torch.nn.Module, root: Path, configs: dict[str, Any], prompts: list[list[int]]
) -> dict[tuple[str, tuple[int, ...]], list[int]]:
    """Save one random-steered adapter per ``configs`` entry under ``root``, then assert that the built-in engine,
    serving every (prompt, adapter) pair in one mixed batch, returns each adapter's greedy offline ``generate``.
    Returns those tokens, by (adapter, prompt)."""
    from iapt import get_iapt_model
    from iapt.serving import Engine, Request

    expected = {}
    for name, config in configs.items():
        torch.manual_seed(0)  # the same generator weights for every entry: only the configs differ
        model = get_iapt_model(base, config)
        for g in model.generators.values():
            torch.nn.init.normal_(g.up.weight, std=0.1)
        model.save_pretrained(root / name)
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            expected[name, tuple(p)] = out[0, len(p) :].tolist()
        model.unload()
    engine = Engine(base, tiny_tokenizer(), root)
    try:
        requests = [Request(p, name, max_tokens=5) for p in prompts for name in configs]
        for r, h in zip(requests, engine.generate_many(requests), strict=True):
            assert h.tokens == expected[r.adapter, tuple(r.prompt)], r
    finally:
        engine.close()
    return expected


def reloaded(model: Any, root: Path) -> Any:
    """``model`` (an IAPTModel) saved under ``root`` and loaded back on its own base, asserted to give exactly the
    same logits on ``left_padded_batch``; returns the loaded model."""
    from iapt import IAPTModel

    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(root)
    loaded = IAPTModel.from_pretrained(model.unload(), root)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    return loaded


def layer_inputs(model: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """What each decoder layer of ``model`` (an IAPTModel on a Llama-layout base) reads: its input hidden states,
    slots included, in one no-grad forward of ``ids``."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
        for i, layer in enumerate(model.base_model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen
