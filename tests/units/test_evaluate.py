"""training/evaluate.py: answers come back in the examples' order whatever the batching, beside the trivial answer."""

from __future__ import annotations

import pytest

from iapt import IAPTConfig, get_iapt_model
from iapt.data import Example
from iapt.training.evaluate import generate_answers, label_report, score_answers
from tests.test_model import randomize_up_projections
from tests.tiny import tiny_lm, tiny_tokenizer


def test_answers_keep_the_examples_order_and_the_models_mode():
    tokenizer = tiny_tokenizer()
    model = get_iapt_model(tiny_lm(), IAPTConfig(bottleneck=4))
    randomize_up_projections(model)
    examples = [Example(prompt="x" * n, response="") for n in (9, 2, 6, 1, 4)]  # lengths sorted differently
    model.train()
    batched = generate_answers(model, tokenizer, examples, max_new_tokens=4, batch_size=2, progress=False)
    assert model.training, "the caller's mode is restored"
    alone = [generate_answers(model, tokenizer, [ex], max_new_tokens=4, progress=False)[0] for ex in examples]
    assert batched == alone


def test_label_report_and_accuracy_sit_beside_the_majority_rate():
    examples = [Example(prompt="p", response=r, label=r) for r in ("yes", "yes", "no", "yes")]
    answers = ["Yes.", "no", "no", "maybe"]
    report = label_report(answers, examples, ["yes", "no"])
    assert report["majority_rate"] == 75.0 and report["gold_labels"] == {"yes": 3, "no": 1}
    assert report["predicted_labels"] == {"no": 2, "yes": 1, "(none)": 1}
    score, each = score_answers("accuracy", answers, examples, ["yes", "no"])
    assert each == [100.0, 0.0, 100.0, 0.0] and score == 50.0
    with pytest.raises(ValueError, match="unknown metric"):
        score_answers("bleurt", answers, examples)
