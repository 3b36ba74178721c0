"""The packaged model (SmolLM2-135M-Instruct, float32) behind the project's API: --engine vllm answers as builtin.

The same app on the built-in Engine and on VLLMEngine, the same chat and completion requests through the
openai client: the greedy answers are the same text, for an adapter and for the base.
"""

from __future__ import annotations

from typing import cast

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write one word that rhymes with cat, please."]
MAX_TOKENS = 12


def test_vllm_engine_answers_as_the_builtin_engine(tmp_path):
    import openai

    from iapt.serving.app import BackgroundServer, create_app
    from iapt.serving.engine import Engine
    from iapt.vllm.engine import VLLMEngine
    from tests.vllm.servers import packaged_model_with_adapter

    model, tokenizer = packaged_model_with_adapter(tmp_path / "base", tmp_path / "adapters" / "demo")

    def answers(app) -> list[str]:
        with BackgroundServer(app) as server:
            client = openai.OpenAI(api_key="none", base_url=server.url + "/v1", max_retries=0, timeout=120)
            out = []
            for model_name in ("demo", "smol"):
                for q in QUESTIONS:
                    chat = client.chat.completions.create(
                        model=model_name,
                        messages=[{"role": "user", "content": q}],
                        max_tokens=MAX_TOKENS,
                        temperature=0,
                    )
                    out.append(chat.choices[0].message.content or "")
                    text = client.completions.create(model=model_name, prompt=q, max_tokens=MAX_TOKENS, temperature=0)
                    out.append(text.choices[0].text)
            return out

    builtin = Engine(model, tokenizer, tmp_path / "adapters", base_name="smol")
    want = answers(create_app(builtin))
    builtin.close()
    engine = VLLMEngine(
        tmp_path / "base",
        tmp_path / "adapters",
        base_name="smol",
        max_model_len=512,
        engine_kwargs={"enforce_eager": True, "seed": 0},
    )
    try:
        got = answers(create_app(cast(Engine, engine)))
    finally:
        engine.close()
    assert got == want
    assert want[: 2 * len(QUESTIONS)] != want[2 * len(QUESTIONS) :], "the adapter changes the base's answers"
