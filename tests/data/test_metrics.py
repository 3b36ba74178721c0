"""Metrics on hand-made cases whose values were worked out by hand (see the comments)."""

from __future__ import annotations

import pytest

from iapt.data import accuracy, bleu, match_label, normalize_answer, rouge_l, squad_exact_match, squad_f1, squad_scores

LABELS = ("positive", "negative", "neutral", "ambivalent")


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("positive", "positive"),
        (" Positive.\nThe review praises the staff.", "positive"),  # first line only
        ("NEGATIVE!", "negative"),
        ("neutral, mostly", "neutral"),  # first word is a label
        ("I think positive", "positive"),  # a sentence naming exactly one label
        ("The sentiment of this review is neutral.", "neutral"),
        ("positive or negative, hard to say", "positive"),  # the first word decides
        ("it is not negative but positive", None),  # two labels named: no answer
        ("good", None),
        ("", None),
        ("\n\npositive", "positive"),  # leading blank lines are skipped
    ],
)
def test_match_label(generation: str, expected: str | None) -> None:
    assert match_label(generation, LABELS) == expected


def test_match_label_keeps_the_label_spelling() -> None:
    assert match_label("true.", ("True", "False", "Neither")) == "True"


def test_accuracy_counts_unmatched_as_wrong() -> None:
    preds = ["Positive", "negative.", "no idea", "neutral"]
    gold = ["positive", "negative", "neutral", "ambivalent"]
    assert accuracy(preds, gold, LABELS) == 50.0  # 2 of 4


def test_accuracy_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"], LABELS)


def test_squad_normalisation() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_squad_f1_by_hand() -> None:
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]
    # overlap 2: precision 2/2, recall 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("dog", ["a cat sat down"]) == 0.0
    # max over gold answers: the second gold matches exactly
    assert squad_f1("the cat sat", ["a cat sat down", "cat sat"]) == pytest.approx(1.0)
    # repeated tokens count once per occurrence: [cat, cat] vs [cat] -> P 1/2, R 1, F1 2/3
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)


def test_squad_exact_match() -> None:
    assert squad_exact_match("The Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert squad_exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert squad_exact_match("Broncos", ["Denver Broncos", "broncos"]) == 1.0


def test_squad_scores_are_percent_means() -> None:
    scores = squad_scores(["the cat sat", "Paris"], [["a cat sat down"], ["paris", "Paris, France"]])
    assert scores["exact_match"] == pytest.approx(50.0)  # 0 + 1
    assert scores["f1"] == pytest.approx(90.0)  # (0.8 + 1.0) / 2


def test_bleu_by_hand() -> None:
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (equal length, brevity penalty 1):
    # 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3 -> (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 0.5373
    assert bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(53.73, abs=0.01)


def test_bleu_multiple_and_ragged_references() -> None:
    assert bleu(["the cat sat on the mat"], [["a dog ran", "the cat sat on the mat"]]) == pytest.approx(100.0)
    # different numbers of references per prediction are allowed
    score = bleu(
        ["the cat sat on the mat", "a dog ran in the park"],
        [["the cat sat on the mat"], ["x y z", "a dog ran in the park", "q"]],
    )
    assert score == pytest.approx(100.0)
    assert bleu(["completely different words here"], [["the cat sat on the mat"]]) < 1.0


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat", "the cat sat down") = 3: P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    assert rouge_l(["the cat sat"], [["the cat sat down"]]) == pytest.approx(100 * 6 / 7)
    # best reference wins; the mean runs over predictions
    assert rouge_l(["the cat sat", "dog"], [["zzz", "the cat sat"], ["cat"]]) == pytest.approx(50.0)
