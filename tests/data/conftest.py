"""Fixtures for the data tests: a tiny tokenizer built in code and synthetic BIG-bench task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from iapt.data import tasks

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = [
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis is the capital.",
    "Review: the hotel was lovely and clean. positive negative neutral ambivalent",
]


def make_tokenizer(*, chat_template: str | None = None, adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on two sentences: any text round-trips, pieces are small and deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if adds_bos:  # Llama-style: the tokenizer itself prepends <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture
def plain_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=CHAT_TEMPLATE)


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def synthetic_task_files() -> dict[str, object]:
    """Small files in the real BIG-bench layouts, keyed by their path under benchmark_tasks/."""
    sentiments = ["positive", "negative", "neutral", "ambivalent"]
    multiemo = {
        "name": "all_text_en",
        "examples": [
            {"input": f"Review number {i}.", "target_scores": {s: int(s == sentiments[i % 4]) for s in sentiments}}
            for i in range(200)
        ],
    }
    verdicts = ["True", "False", "Neither"]
    vitaminc = {
        "name": "vitaminc_fact_verification",
        "examples": [
            {
                "input": f"Page {p}: Fact {r} about page {p} .\nClaim: Claim {r} about page {p} .",
                "target_scores": {v: int(v == verdicts[(p + r) % 3]) for v in verdicts},
            }
            for p in range(60)
            for r in range(1 + p % 5)
        ],
    }
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": f"Article_{a}",
                "paragraphs": [
                    {
                        "context": f"Paragraph {k} of article {a}.",
                        "qas": [
                            {
                                "id": f"q{a}-{k}-{q}",
                                "question": f"Question {q}?",
                                "answers": [
                                    {"answer_start": 0, "text": f"answer {q}"},
                                    {"answer_start": 0, "text": f"answer {q}"},
                                    {"answer_start": 0, "text": f"the answer {q}"},
                                ],
                            }
                            for q in range(1 + (a + k) % 4)
                        ],
                    }
                    for k in range(1 + a % 3)
                ],
            }
            for a in range(30)
        ],
    }
    e2e_rows = []
    for m in range(50):
        for r in range(1 + m % 4):
            e2e_rows.append(
                {
                    "input": f"name: Place {m}, food: Thai",
                    "target": f"Place {m} serves Thai food, version {r}.",
                    "comment": f"e2e_nlg-test-{len(e2e_rows)}",
                }
            )
    e2e = {"name": "e2e_nlg", "examples": e2e_rows[::2] + e2e_rows[1::2]}  # one MR's references are not contiguous
    return {
        "multiemo/all_text_en/task.json": multiemo,
        "vitaminc_fact_verification/task.json": vitaminc,
        "squad_shifts/squaddev_v1.1.json": squad,
        "gem/e2e_nlg/task.json": e2e,
    }


@pytest.fixture
def task_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache dir ($IAPT_CACHE) holding the synthetic task files, as if `iapt data fetch` had run."""
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "cache"))
    root = tasks.cache_dir() / f"bigbench-{tasks.BIGBENCH_VERSION}"
    for rel, data in synthetic_task_files().items():
        write_json(root / rel, data)
    tasks._splits.cache_clear()
    return tasks.cache_dir()
