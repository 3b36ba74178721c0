"""The example adapters shipped in examples/adapters, served on the real packaged model, as the README runs them."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from iapt import IAPTModel
from iapt.data import get_task
from iapt.models import load_default
from iapt.serving import Engine, create_app
from iapt.serving.app import BackgroundServer
from iapt.serving.auth import KeyRing

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def served():
    base, tokenizer = load_default()
    engine = Engine(base, tokenizer, EXAMPLES / "adapters", base_name="default", max_batch_size=8)
    app = create_app(engine, KeyRing.from_file(EXAMPLES / "keys.yaml"))
    with BackgroundServer(app) as srv:
        yield srv, engine, tokenizer
    engine.close()


def test_both_example_adapters_load(served):
    _, engine, _ = served
    assert engine.load_errors == {}
    assert sorted(engine.adapters) == ["e2e", "sentiment"]


def test_example_tenants_through_the_openai_client(served):
    """Each key reaches its own adapter only; greedy answers equal offline IAPTModel.generate."""
    srv, _, tokenizer = served
    offline_base, _ = load_default()
    reviews = openai.OpenAI(api_key="sk-reviews", base_url=srv.url + "/v1", max_retries=0, timeout=120)
    bistro = openai.OpenAI(api_key="sk-bistro", base_url=srv.url + "/v1", max_retries=0, timeout=120)
    assert [m.id for m in reviews.models.list()] == ["default", "sentiment"]
    assert [m.id for m in bistro.models.list()] == ["e2e"]
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter: as if it did not exist
        bistro.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": "hi"}])

    for client, task, name in ((reviews, "sentiment", "sentiment"), (bistro, "e2e", "e2e")):
        example = get_task(task).load("test", limit=1)[0]
        messages = [{"role": "user", "content": example.prompt}]
        answer = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
        text = answer.choices[0].message.content
        text_in = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text_in, add_special_tokens=False).input_ids])
        model = IAPTModel.from_pretrained(offline_base, EXAMPLES / "adapters" / name)  # not the engine's: it runs
        try:
            offline = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        finally:
            model.unload()
        assert text == tokenizer.decode(offline[0, ids.shape[1] :], skip_special_tokens=True), name


def test_the_readmes_example_review_gets_the_right_label(served):
    """The README's curl request to the sentiment tenant, and its opposite, answered with the right label."""
    import re

    srv, _, _ = served
    readme = (EXAMPLES.parent / "README.md").read_text()
    review = re.search(r'"content": "Review: (.*?)\\n\\nIs the sentiment', readme).group(1)
    reviews = openai.OpenAI(api_key="sk-reviews", base_url=srv.url + "/v1", max_retries=0, timeout=120)
    question = "\n\nIs the sentiment of this review positive, negative, neutral or ambivalent? Answer with one word."
    for text, label in (
        (review, "negative"),
        ("Lovely hotel, friendly staff and a great breakfast. We will come back!", "positive"),
    ):
        answer = reviews.chat.completions.create(
            model="sentiment",
            max_tokens=8,
            temperature=0,
            messages=[{"role": "user", "content": f"Review: {text}{question}"}],
        )
        assert answer.choices[0].message.content.strip().lower().startswith(label), (text, answer)
