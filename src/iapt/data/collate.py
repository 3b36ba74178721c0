"""Prompt formatting, tokenisation and batch padding for IAPT training and generation.

The prompt (the instruction, rendered with the tokenizer's chat template when it has one) and the
response are tokenised separately so the instruction/response boundary is exact: ``labels`` are
-100 and ``instruction_mask`` is 1 on precisely the prompt tokens, and generation sees the very
same prompt tokens the model was trained on.

Too-long examples lose tokens from the *left of the prompt* (just after BOS, if the tokenizer adds
one); the response is never cut. The built-in tasks therefore put the passage first and the
question or instruction last, so truncation removes the start of the passage, not the question.
An example whose response alone does not fit is dropped by :func:`encode_examples`, which reports
how many and why; :func:`encode_example` raises :class:`ResponseTooLong` for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .examples import DataError, Example, Message

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
_FALLBACK_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}


class ResponseTooLong(DataError):
    """The response (with EOS) leaves no room for the prompt within ``max_length``."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str | list[Message], *, use_chat_template: bool | None = None) -> str:
    """Prompt text ending where the response starts.

    With a chat template (used by default when the tokenizer has one) the prompt is rendered with
    ``add_generation_prompt=True``; a plain string becomes one user message. Otherwise the plain
    ``### Instruction: ... ### Response:`` template is used (chat turns get one section per role).
    """
    use = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if use:
        if not has_chat_template(tokenizer):
            raise DataError("use_chat_template=True but the tokenizer has no chat_template")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return FALLBACK_TEMPLATE.format(instruction=prompt)
    sections = [_FALLBACK_HEADERS.get(m["role"], f"### {m['role'].capitalize()}:\n") + m["content"] for m in messages]
    return "\n\n".join(sections) + "\n\n### Response:\n"


@dataclass
class Encoded:
    """One tokenised example; ``truncated`` counts prompt tokens cut from the left."""

    input_ids: list[int]
    labels: list[int]
    instruction_mask: list[int]
    truncated: int = 0

    @property
    def prompt_length(self) -> int:
        return sum(self.instruction_mask)


@dataclass
class EncodeReport:
    """What :func:`encode_examples` did: kept, prompt-truncated, and dropped examples (by reason)."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def __str__(self) -> str:
        text = f"kept {self.kept}/{self.total} examples ({self.truncated} with the prompt truncated from the left)"
        for reason, indices in self.dropped.items():
            shown = ", ".join(map(str, indices[:10])) + (", ..." if len(indices) > 10 else "")
            text += f"; dropped {len(indices)}: {reason} (indices {shown})"
        return text


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer adds BOS by itself (Llama-style), else ``[]`` (GPT-2-style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _prompt_ids(tokenizer: Any, text: str, prefix: list[int]) -> list[int]:
    # Chat templates often write the BOS text themselves; add it only when missing.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids if not prefix or ids[: len(prefix)] == prefix else prefix + ids


def _truncate_left(ids: list[int], keep: int, prefix: list[int]) -> list[int]:
    if len(ids) <= keep:
        return ids
    if prefix and ids[: len(prefix)] == prefix and keep > len(prefix):
        return prefix + ids[len(ids) - (keep - len(prefix)) :]
    return ids[len(ids) - keep :]


def _encode(
    tokenizer: Any, prompt_text: str, response: str, max_length: int, prefix: list[int], min_prompt_tokens: int
) -> Encoded:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; set one so the model learns where a response ends")
    response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [eos]
    room = max_length - len(response_ids)
    if room < min_prompt_tokens:
        raise ResponseTooLong(
            f"response is {len(response_ids)} tokens with EOS; max_length {max_length} leaves room for "
            f"{max(room, 0)} prompt tokens (need at least {min_prompt_tokens})"
        )
    full_prompt = _prompt_ids(tokenizer, prompt_text, prefix)
    prompt_ids = _truncate_left(full_prompt, room, prefix)
    n = len(prompt_ids)
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * n + response_ids,
        instruction_mask=[1] * n + [0] * len(response_ids),
        truncated=len(full_prompt) - n,
    )


def encode_example(
    tokenizer: Any,
    example: Example,
    max_length: int,
    *,
    use_chat_template: bool | None = None,
    min_prompt_tokens: int = 1,
) -> Encoded:
    """Tokenise one training example; raises :class:`ResponseTooLong` if the response does not fit."""
    text = format_prompt(tokenizer, example.prompt, use_chat_template=use_chat_template)
    return _encode(tokenizer, text, example.response, max_length, _bos_prefix(tokenizer), min_prompt_tokens)


def encode_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    *,
    use_chat_template: bool | None = None,
    min_prompt_tokens: int = 1,
) -> tuple[list[Encoded], EncodeReport]:
    """Tokenise a dataset, dropping examples whose response cannot fit; the report says which and why."""
    prefix = _bos_prefix(tokenizer)
    report = EncodeReport(total=len(examples))
    encoded: list[Encoded] = []
    for i, ex in enumerate(examples):
        text = format_prompt(tokenizer, ex.prompt, use_chat_template=use_chat_template)
        try:
            item = _encode(tokenizer, text, ex.response, max_length, prefix, min_prompt_tokens)
        except ResponseTooLong:
            report.dropped.setdefault(f"response does not fit in max_length={max_length}", []).append(i)
            continue
        encoded.append(item)
        report.truncated += item.truncated > 0
    report.kept = len(encoded)
    return encoded, report


def encode_prompt(
    tokenizer: Any,
    prompt: str | list[Message] | Example,
    max_length: int | None = None,
    *,
    use_chat_template: bool | None = None,
) -> Encoded:
    """Prompt-only encoding for generation (left-truncated to ``max_length`` if given)."""
    if isinstance(prompt, Example):
        prompt = prompt.prompt
    prefix = _bos_prefix(tokenizer)
    full = _prompt_ids(tokenizer, format_prompt(tokenizer, prompt, use_chat_template=use_chat_template), prefix)
    ids = full if max_length is None else _truncate_left(full, max_length, prefix)
    return Encoded(
        input_ids=ids, labels=[IGNORE_INDEX] * len(ids), instruction_mask=[1] * len(ids), truncated=len(full) - len(ids)
    )


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (padding is masked out, so any id works)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad_token nor an eos_token to pad with")
    return pad


@dataclass
class Collator:
    """Pads a list of :class:`Encoded` (or dicts with the same keys) into a batch of tensors.

    Training: ``padding_side="right"`` (or ``"left"``). Generation: encode prompts with
    :func:`encode_prompt` and use ``padding_side="left"`` so every prompt ends at the last column.
    Returns ``input_ids, attention_mask, labels, instruction_mask`` (long tensors, shape [B, T]).
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, padding_side: Literal["right", "left"] = "right", **kwargs: Any
    ) -> Collator:
        return cls(pad_token_id(tokenizer), padding_side, **kwargs)

    def __call__(self, batch: Sequence[Encoded | Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {self.padding_side!r}")
        rows = [item if isinstance(item, Mapping) else vars(item) for item in batch]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": [], "instruction_mask": []}
        for r in rows:
            n = len(r["input_ids"])
            values = {
                "input_ids": (list(r["input_ids"]), self.pad_token_id),
                "attention_mask": ([1] * n, 0),
                "labels": (list(r.get("labels") or [IGNORE_INDEX] * n), IGNORE_INDEX),
                "instruction_mask": (list(r.get("instruction_mask") or [1] * n), 0),
            }
            for key, (seq, pad) in values.items():
                padding = [pad] * (width - n)
                out[key].append(seq + padding if self.padding_side == "right" else padding + seq)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in out.items()}
