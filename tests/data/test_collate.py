"""Prompt formatting, the exact prompt/response boundary, truncation and padding."""

from __future__ import annotations

import pytest
import torch

from iapt.data import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    Collator,
    DataError,
    Example,
    ResponseTooLong,
    encode_example,
    encode_examples,
    encode_prompt,
    format_prompt,
)

from .conftest import CHAT_TEMPLATE, make_tokenizer

EX = Example("What is the capital of France?", "Paris is the capital.")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- formatting ----------------------------------------------------------------------------------


def test_fallback_template_without_chat_template(plain_tokenizer) -> None:
    assert format_prompt(plain_tokenizer, "Do X.") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert FALLBACK_TEMPLATE.format(instruction="Do X.") == format_prompt(plain_tokenizer, "Do X.")


def test_fallback_renders_chat_turns_by_role(plain_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert format_prompt(plain_tokenizer, messages) == (
        "### System:\nBe brief.\n\n### Instruction:\nHi\n\n"
        "### Response:\nHello\n\n### Instruction:\nBye\n\n### Response:\n"
    )
    # a single user turn renders exactly like a plain instruction
    assert format_prompt(plain_tokenizer, messages[1:2]) == format_prompt(plain_tokenizer, "Hi")


def test_chat_template_used_when_present(chat_tokenizer) -> None:
    assert format_prompt(chat_tokenizer, "Do X.") == "<s><|user|>Do X.\n<|assistant|>"
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert format_prompt(chat_tokenizer, turns) == "<s><|system|>S\n<|user|>U\n<|assistant|>"


def test_chat_template_can_be_switched_off_or_required(chat_tokenizer, plain_tokenizer) -> None:
    assert format_prompt(chat_tokenizer, "Do X.", use_chat_template=False) == FALLBACK_TEMPLATE.format(
        instruction="Do X."
    )
    with pytest.raises(DataError, match="no chat_template"):
        format_prompt(plain_tokenizer, "Do X.", use_chat_template=True)


# --- the prompt/response boundary ----------------------------------------------------------------


@pytest.mark.parametrize("with_template", [False, True])
def test_labels_and_instruction_mask_cover_exactly_the_prompt(with_template: bool) -> None:
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE if with_template else None)
    enc = encode_example(tok, EX, max_length=512)
    prompt = ids(tok, format_prompt(tok, EX.prompt))
    response = ids(tok, EX.response) + [tok.eos_token_id]
    n = len(prompt)
    assert enc.input_ids == prompt + response
    assert enc.labels == [IGNORE_INDEX] * n + response
    assert enc.instruction_mask == [1] * n + [0] * len(response)
    assert enc.prompt_length == n and enc.truncated == 0
    # the exact text round-trips: the boundary is where the prompt text ends
    assert tok.decode(enc.input_ids[:n]) == format_prompt(tok, EX.prompt)
    assert tok.decode(enc.input_ids[n:]) == EX.response + tok.eos_token


def test_generation_prompt_is_the_training_prompt(chat_tokenizer) -> None:
    train = encode_example(chat_tokenizer, EX, max_length=512)
    gen = encode_prompt(chat_tokenizer, EX)
    assert gen.input_ids == train.input_ids[: train.prompt_length]
    assert gen.labels == [IGNORE_INDEX] * len(gen.input_ids) and gen.instruction_mask == [1] * len(gen.input_ids)


@pytest.mark.parametrize("with_template", [False, True])
def test_bos_added_once_for_tokenizers_that_add_it(with_template: bool) -> None:
    # the chat template writes "<s>" itself; the fallback does not; either way exactly one BOS
    tok = make_tokenizer(chat_template=CHAT_TEMPLATE if with_template else None, adds_bos=True)
    enc = encode_example(tok, EX, max_length=512)
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids.count(tok.bos_token_id) == 1


def test_no_bos_for_gpt2_style_tokenizer(plain_tokenizer) -> None:
    enc = encode_example(plain_tokenizer, EX, max_length=512)
    assert plain_tokenizer.bos_token_id not in enc.input_ids


# --- truncation ----------------------------------------------------------------------------------


def test_long_prompt_is_cut_from_the_left_and_response_kept(plain_tokenizer) -> None:
    tok = plain_tokenizer
    long = Example("word " * 200 + "What is the capital of France?", "Paris is the capital.")
    response = ids(tok, long.response) + [tok.eos_token_id]
    full_prompt = ids(tok, format_prompt(tok, long.prompt))
    enc = encode_example(tok, long, max_length=64)
    assert len(enc.input_ids) == 64
    assert enc.input_ids[-len(response) :] == response
    assert enc.input_ids[: 64 - len(response)] == full_prompt[-(64 - len(response)) :]  # the prompt's end survives
    assert enc.truncated == len(full_prompt) - (64 - len(response))
    assert enc.labels.count(IGNORE_INDEX) == 64 - len(response)


def test_truncation_keeps_bos_in_front() -> None:
    tok = make_tokenizer(adds_bos=True)
    enc = encode_example(tok, Example("word " * 200, "ok"), max_length=32)
    assert len(enc.input_ids) == 32 and enc.input_ids[0] == tok.bos_token_id and enc.truncated > 0


def test_response_that_does_not_fit_is_flagged(plain_tokenizer) -> None:
    too_long = Example("Q?", "answer " * 100)
    with pytest.raises(ResponseTooLong, match="max_length 32"):
        encode_example(plain_tokenizer, too_long, max_length=32)
    ok = Example("Q?", "A.")
    encoded, report = encode_examples(plain_tokenizer, [ok, too_long, ok, Example("word " * 100, "A.")], max_length=32)
    assert len(encoded) == 3
    assert (report.total, report.kept, report.truncated, report.num_dropped) == (4, 3, 1, 1)
    assert list(report.dropped.values()) == [[1]]
    assert "dropped 1" in str(report) and "max_length=32" in str(report) and "indices 1" in str(report)


def test_min_prompt_tokens(plain_tokenizer) -> None:
    ex = Example("a long enough question " * 10, "A.")
    n_response = len(ids(plain_tokenizer, "A.")) + 1
    encode_example(plain_tokenizer, ex, max_length=n_response + 1)  # one prompt token left: allowed by default
    with pytest.raises(ResponseTooLong):
        encode_example(plain_tokenizer, ex, max_length=n_response + 1, min_prompt_tokens=8)


def test_generation_prompt_truncation(plain_tokenizer) -> None:
    enc = encode_prompt(plain_tokenizer, "word " * 100, max_length=20)
    assert len(enc.input_ids) == 20 and enc.truncated > 0


# --- padding -------------------------------------------------------------------------------------


def _batch(tok):
    return [encode_example(tok, EX, 512), encode_example(tok, Example("Hi", "Yo"), 512)]


def test_right_padding(plain_tokenizer) -> None:
    a, b = _batch(plain_tokenizer)
    out = Collator.from_tokenizer(plain_tokenizer)([a, b])
    assert set(out) == {"input_ids", "attention_mask", "labels", "instruction_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, len(a.input_ids)) for t in out.values())
    n, pad = len(b.input_ids), len(a.input_ids) - len(b.input_ids)
    assert pad > 0
    assert out["input_ids"][1].tolist() == b.input_ids + [plain_tokenizer.pad_token_id] * pad
    assert out["attention_mask"][1].tolist() == [1] * n + [0] * pad
    assert out["labels"][1].tolist() == b.labels + [IGNORE_INDEX] * pad
    assert out["instruction_mask"][1].tolist() == b.instruction_mask + [0] * pad
    assert out["input_ids"][0].tolist() == a.input_ids and out["attention_mask"][0].all()


def test_left_padding(plain_tokenizer) -> None:
    a, b = _batch(plain_tokenizer)
    out = Collator.from_tokenizer(plain_tokenizer, padding_side="left")([a, b])
    pad = len(a.input_ids) - len(b.input_ids)
    assert out["input_ids"][1].tolist() == [plain_tokenizer.pad_token_id] * pad + b.input_ids
    assert out["attention_mask"][1].tolist() == [0] * pad + [1] * len(b.input_ids)
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * pad + b.labels
    assert out["instruction_mask"][1].tolist() == [0] * pad + b.instruction_mask


def test_generation_batch_is_left_padded_prompts(chat_tokenizer) -> None:
    prompts = [encode_prompt(chat_tokenizer, EX), encode_prompt(chat_tokenizer, "Hi")]
    out = Collator.from_tokenizer(chat_tokenizer, padding_side="left")(prompts)
    assert out["attention_mask"][:, -1].all()  # every prompt ends in the last column
    assert torch.equal(out["instruction_mask"], out["attention_mask"])
    assert (out["labels"] == IGNORE_INDEX).all()
    assert out["input_ids"][1, -len(prompts[1].input_ids) :].tolist() == prompts[1].input_ids


def test_pad_to_multiple_and_dict_items(plain_tokenizer) -> None:
    a, _ = _batch(plain_tokenizer)
    out = Collator(pad_token_id=0, pad_to_multiple_of=8)([vars(a)])
    assert out["input_ids"].shape[1] % 8 == 0 and out["input_ids"].shape[1] >= len(a.input_ids)


def test_pad_falls_back_to_eos() -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    assert Collator.from_tokenizer(tok).pad_token_id == tok.eos_token_id
