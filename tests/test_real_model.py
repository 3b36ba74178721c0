"""IAPT on the real packaged model (SmolLM2-135M-Instruct): the invariants hold on a pretrained Llama."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from iapt.data import Collator, encode_prompt
from iapt.models import load_default

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a colour.", "Write one word that rhymes with cat, please."]


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = load_default()  # the user cache: cold the first time (~15 s), then ~1 s
    iapt = get_iapt_model(model, IAPTConfig())
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: soft tokens that depend on the instruction
        for gen in iapt.generators.values():
            torch.nn.init.normal_(gen.up.weight, std=0.05)
    yield iapt, tokenizer
    iapt.unload()


def batch(tokenizer):
    return Collator.from_tokenizer(tokenizer, padding_side="left")([encode_prompt(tokenizer, p) for p in PROMPTS])


def test_parameter_count_is_the_papers_formula(loaded):
    model, _ = loaded
    assert model.get_nb_trainable_parameters()[0] == 30 * (2 * 576 * 32 + 32 * 4 + 12 + 32 + 576) == 1_128_360


def test_left_padding_and_cached_generation_on_the_real_model(loaded):
    model, tokenizer = loaded
    b = batch(tokenizer)
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i, prompt in enumerate(PROMPTS):
            alone = torch.tensor([encode_prompt(tokenizer, prompt).input_ids])
            torch.testing.assert_close(logits[i, -alone.shape[1] :], model(alone).logits[0], atol=2e-4, rtol=1e-4)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**kw), model.generate(**kw, use_cache=False))


def test_zero_soft_tokens_keep_the_model_answering(tmp_path):
    """A fresh zero-start adapter (the paper's start) still answers like the backbone: Paris stays Paris. (The
    default pad-anchored start does not here: 4 end-of-turn tokens in front turn this answer French; see
    docs/METHOD.md.)"""
    base, tokenizer = load_default()
    model = get_iapt_model(base, IAPTConfig(anchor="none"))
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[0]).input_ids])
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    model.save_pretrained(tmp_path)
    again = IAPTModel.from_pretrained(model.unload(), tmp_path)
    assert torch.equal(again.generate(input_ids=ids, max_new_tokens=12, do_sample=False), out)


def test_a_peft_user_script_runs_unchanged_on_the_default_model(tmp_path):
    """get_peft_model -> transformers.Trainer -> save -> PeftModel.from_pretrained -> generate, with IAPTConfig."""
    from peft import PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    import iapt

    base, tokenizer = load_default()
    model = get_peft_model(base, iapt.IAPTConfig(bottleneck=8))
    rows = []
    for review, label in [("Great stay, lovely staff.", "positive"), ("Dirty room, rude staff.", "negative")] * 2:
        prompt = encode_prompt(tokenizer, f"Review: {review}\n\nPositive or negative?").input_ids
        answer = tokenizer(label + tokenizer.eos_token, add_special_tokens=False).input_ids
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    width = max(len(r["input_ids"]) for r in rows)
    for r in rows:  # right-pad to one length (the default collator stacks)
        pad = width - len(r["input_ids"])
        r["attention_mask"] = [1] * len(r["input_ids"]) + [0] * pad
        r["input_ids"] = r["input_ids"] + [tokenizer.pad_token_id] * pad
        r["labels"] = r["labels"] + [-100] * pad
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    model.save_pretrained(tmp_path / "adapter")
    batch_in = batch(tokenizer)
    with torch.no_grad():
        expected = model.generate(
            input_ids=batch_in["input_ids"],
            attention_mask=batch_in["attention_mask"],
            max_new_tokens=6,
            do_sample=False,
        )
    bare = model.base_model.unload()
    loaded = PeftModel.from_pretrained(bare, str(tmp_path / "adapter"))
    with torch.no_grad():
        again = loaded.generate(
            input_ids=batch_in["input_ids"],
            attention_mask=batch_in["attention_mask"],
            max_new_tokens=6,
            do_sample=False,
        )
    assert torch.equal(again, expected)
