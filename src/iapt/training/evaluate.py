"""Generation-based evaluation: answers are generated (greedy), then scored by the task's metric."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from iapt.data import Collator, Example, encode_prompt, get_task
from iapt.data.metrics import match_label


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to the examples' prompts, in their order; works for IAPT and plain HF models alike."""
    encoded = [encode_prompt(tokenizer, ex, max_length=max_length) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding per batch
    collate = Collator.from_tokenizer(tokenizer, padding_side="left")
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([encoded[i] for i in idx])
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=collate.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text.strip()
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return answers


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: str,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on a built-in task: metrics, counts, timing and a few answers to eyeball."""
    spec = get_task(task)
    examples = spec.load(split, limit=limit)
    start = time.perf_counter()
    answers = generate_answers(
        model, tokenizer, examples, spec.max_new_tokens, batch_size, max_length, progress, desc=f"{task}/{split}"
    )
    seconds = time.perf_counter() - start
    scores = spec.score(answers, examples)
    report: dict[str, Any] = {
        "task": task,
        "split": split,
        "examples": len(examples),
        "metrics": scores,
        "per_example": [round(v, 3) for v in spec.score_each(answers, examples)],
        "seconds": round(seconds, 2),
        "samples": [{"reference": ex.references[0], "answer": a} for ex, a in list(zip(examples, answers))[:5]],
    }
    if spec.labels:
        report.update(label_report(answers, examples, spec.labels))
    return report


def label_report(answers: Sequence[str], examples: Sequence[Example], labels: Sequence[str]) -> dict[str, Any]:
    """A classifier is read beside the trivial answer: the majority-class rate, the gold labels, what it answers."""
    gold = Counter(ex.label or ex.response for ex in examples)
    predicted = Counter(match_label(a, labels) or "(none)" for a in answers)
    return {
        "majority_rate": round(100.0 * max(gold.values()) / len(examples), 2) if examples else 0.0,
        "gold_labels": dict(gold.most_common()),
        "predicted_labels": dict(predicted.most_common()),
    }


FILE_METRICS = ("exact_match", "accuracy", "f1", "rougeL", "bleu")


def _responses(examples: Sequence[Example]) -> list[str]:
    """The label set of a file without one: its distinct gold answers."""
    return sorted({ex.label or ex.response for ex in examples})


def score_answers(
    metric: str, answers: Sequence[str], examples: Sequence[Example], labels: Sequence[str] | None = None
) -> tuple[float, list[float]]:
    """``metric`` over generated answers against the examples' references: (score, per-example scores), percent.

    ``accuracy`` matches each answer to one of ``labels`` (default: the distinct responses of the examples) the
    way the built-in classification tasks do; ``exact_match`` and ``f1`` are SQuAD's (normalised text);
    ``rougeL`` is the mean best-reference ROUGE-L; ``bleu`` is corpus BLEU (no per-example value: sentence BLEU
    is a different statistic, so the list holds nothing).
    """
    from iapt.data import metrics as m

    references = [list(ex.references) for ex in examples]
    if metric == "accuracy":
        choices = list(labels) if labels else _responses(examples)
        each = [100.0 * (match_label(a, choices) == (ex.label or ex.response)) for a, ex in zip(answers, examples)]
    elif metric == "exact_match":
        each = [100.0 * m.squad_exact_match(a, refs) for a, refs in zip(answers, references)]
    elif metric == "f1":
        each = [100.0 * m.squad_f1(a, refs) for a, refs in zip(answers, references)]
    elif metric == "rougeL":
        each = m.rouge_l_each(answers, references)
    elif metric == "bleu":
        return m.bleu(answers, references), []
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(FILE_METRICS)}")
    return (sum(each) / len(each) if each else 0.0), each


@torch.no_grad()
def evaluate_file(
    model: Any,
    tokenizer: Any,
    path: str,
    metric: str,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int = 64,
    labels: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` by generation on your own file (the training formats), with the metric you choose."""
    from iapt.data import load_examples

    if metric not in FILE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(FILE_METRICS)}")
    examples = load_examples(path)[:limit]
    if not examples:
        raise ValueError(f"{path} holds no examples to score")
    start = time.perf_counter()
    answers = generate_answers(
        model, tokenizer, examples, max_new_tokens, batch_size, max_length, progress, desc=str(path)
    )
    score, each = score_answers(metric, answers, examples, labels)
    report: dict[str, Any] = {
        "data": str(path),
        "examples": len(examples),
        "metrics": {metric: score},
        "per_example": [round(v, 3) for v in each],
        "seconds": round(time.perf_counter() - start, 2),
        "samples": [{"reference": ex.references[0], "answer": a} for ex, a in list(zip(examples, answers))[:5]],
    }
    if metric == "accuracy":
        report.update(label_report(answers, examples, list(labels) if labels else _responses(examples)))
    return report
