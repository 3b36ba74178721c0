"""Evaluation metrics for generated answers. Pure functions; every score is a percentage (0-100).

Generated text is judged the way the reference implementations do: classification answers by
matching a label word, SQuAD with the official v1.1 normalisation (lowercase, no punctuation, no
articles, single spaces) and the max over gold answers, BLEU with sacrebleu's corpus BLEU and
ROUGE-L with rouge-score (stemming on), both against every reference available.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _strip_punct(text: str) -> str:
    return "".join(ch for ch in text if ch not in _PUNCT)


def normalize_label(text: str) -> str:
    """First line of a generation, lowercased, punctuation removed, whitespace collapsed."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return " ".join(_strip_punct(first.lower()).split())


def match_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a generated answer names, or ``None`` if it names none or several.

    The normalised first line may be a label ("Positive."), start with one ("positive, clearly"), or be
    a sentence naming exactly one ("The sentiment of this review is neutral."): chat models answer in
    sentences, and a zero-shot baseline should not lose points for phrasing. Naming two labels is wrong.
    """
    normalized = {normalize_label(label): label for label in labels}
    answer = normalize_label(prediction)
    if answer in normalized:
        return normalized[answer]
    words = answer.split()
    if words and words[0] in normalized:
        return normalized[words[0]]
    named = {normalized[w] for w in words if w in normalized}
    return named.pop() if len(named) == 1 else None


def accuracy(predictions: Sequence[str], labels: Sequence[str], choices: Sequence[str]) -> float:
    """Percent of predictions whose matched label equals the gold label; no match counts as wrong."""
    _check_lengths(predictions, labels)
    if not predictions:
        return 0.0
    hits = sum(match_label(p, choices) == gold for p, gold in zip(predictions, labels))
    return 100.0 * hits / len(predictions)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop punctuation and articles, fix whitespace."""
    return " ".join(_ARTICLES.sub(" ", _strip_punct(text.lower())).split())


def squad_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 (0-1) between prediction and the best-matching gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision = common / len(pred_tokens)
        recall = common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus ``exact_match`` and ``f1`` (percent), each the mean of per-question maxima."""
    _check_lengths(predictions, references)
    n = max(len(predictions), 1)
    em = sum(squad_exact_match(p, r) for p, r in zip(predictions, references))
    f1 = sum(squad_f1(p, r) for p, r in zip(predictions, references))
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (13a tokenisation); each prediction may have a different number of references."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; None marks a missing reference.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    # sacrebleu's annotation says str, but it takes None for a missing reference
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)  # type: ignore[arg-type]


def rouge_l_each(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F-measure (percent) of each prediction against its best reference."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        100.0 * scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (percent), taking for each prediction its best reference."""
    each = rouge_l_each(predictions, references)
    return sum(each) / len(each) if each else 0.0


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
