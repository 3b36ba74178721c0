"""TRL's SFTTrainer with peft_config=IAPTConfig: prompt/completion and conversational data on a tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch
import trl  # a test extra (pyproject): `pip install -e .[test]` brings it
from datasets import Dataset
from peft import get_peft_model

from iapt import IAPTConfig
from tests.tiny import tiny_lm, tiny_tokenizer

PAIRS = [("apple", "yes"), ("zebra", "nah"), ("melon", "yes"), ("wagon", "nah")] * 4


def sft(tmp_path, data: Dataset, **config) -> trl.SFTTrainer:
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        **config,
    )
    return trl.SFTTrainer(
        model=tiny_lm(),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=IAPTConfig(bottleneck=4),
    )


def test_sft_on_prompt_completion_data_trains_the_generators(tmp_path):
    data = Dataset.from_list([{"prompt": f"first letter early? {w}", "completion": f" {a}"} for w, a in PAIRS])
    trainer = sft(tmp_path, data)
    before = {k: v.clone() for k, v in trainer.model.base_model.generators.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="IAPT: .* no instruction token")  # the prompt is pooled
        trainer.train()
    after = trainer.model.base_model.generators.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_fused_head_loss_equals_the_plain_loss_and_drops_the_slot_columns():
    """TRL calls the model with fused_lm_head=True (its patched backbone forward): same loss as IAPT's own, and
    per-token outputs aligned with the caller's labels, without the n slots."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    base = tiny_lm()
    add_fused_lm_head(base)
    model = get_peft_model(base, IAPTConfig(bottleneck=4))
    with torch.no_grad():
        for g in model.base_model.generators.values():
            g.up.weight.normal_(std=0.2)
    ids = torch.randint(4, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as in training
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the instruction
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert fused.log_probs.shape == (2, 8)
    assert torch.equal(fused.label_mask, labels[:, 1:] != -100)


def test_conversational_prompt_completion_pools_the_prompt_turns(tmp_path):
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"first letter early? {w}"}],
                "completion": [{"role": "assistant", "content": a}],
            }
            for w, a in PAIRS
        ]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="IAPT: .* no instruction token")
        sft(tmp_path, data).train()


def test_every_token_labelled_is_a_loud_warning_not_silent(tmp_path):
    """Chat `messages` data trains on every token by default: nothing is left for the generators to pool."""
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"first letter early? {w}"}, {"role": "assistant", "content": a}]}
            for w, a in PAIRS
        ]
    )
    with pytest.warns(UserWarning, match="no instruction token to pool"):
        sft(tmp_path, data).train()


def test_chat_messages_with_assistant_only_loss_pool_the_user_turns(tmp_path):
    """With a template that marks the assistant's turns, TRL labels those only: the user turns are pooled."""
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant>{% generation %}"
        "{{ m['content'] }}\n{% endgeneration %}{% else %}<{{ m['role'] }}>{{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    data = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"first letter early? {w}"}, {"role": "assistant", "content": a}]}
            for w, a in PAIRS
        ]
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        save_strategy="no",
        assistant_only_loss=True,
    )
    trainer = trl.SFTTrainer(
        model=tiny_lm(), args=args, train_dataset=data, processing_class=tok, peft_config=IAPTConfig(bottleneck=4)
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="IAPT: .* no instruction token")
        trainer.train()
