"""The project's server on a tiny vLLM engine, as the server tests start it (one place for its settings)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from iapt.serving.app import BackgroundServer, create_app
from iapt.serving.auth import KeyRing
from iapt.serving.engine import Engine


@contextlib.contextmanager
def tiny_server(base_dir: Path, adapters_dir: Path, keys_file: Path, keys: str) -> Iterator[tuple[Any, Any]]:
    """(server, engine): a ``VLLMEngine`` on ``base_dir`` serving ``adapters_dir``, behind the app with ``keys``
    (written to ``keys_file``) on a background uvicorn; the engine is closed on exit."""
    from iapt.vllm.engine import VLLMEngine

    keys_file.write_text(keys)
    engine = VLLMEngine(
        base_dir,
        adapters_dir,
        base_name="tiny",
        max_batch_size=8,
        max_queue=16,
        max_model_len=128,
        engine_kwargs={"enforce_eager": True, "max_num_batched_tokens": 512, "seed": 0},
    )
    try:
        app = create_app(cast(Engine, engine), KeyRing.from_file(keys_file), max_prompt_tokens=64, max_tokens_limit=100)
        with BackgroundServer(app) as srv:
            yield srv, engine
        srv.stopped_engine = not engine.is_running  # the app's lifespan stops the engine (test_server checks it)
    finally:
        engine.close()


def packaged_model_with_adapter(base_dir: Path, adapter_dir: Path) -> tuple[Any, Any]:
    """The packaged model (SmolLM2-135M-Instruct, float32) saved to ``base_dir`` for vLLM, and a random IAPT
    adapter on it (every layer's up-projection drawn with std 0.05: soft tokens that depend on the instruction)
    saved to ``adapter_dir``. Returns the bare (model, tokenizer)."""
    import torch

    from iapt import IAPTConfig, get_iapt_model
    from iapt.models import load_model

    model, tokenizer = load_model("default")
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    iapt = get_iapt_model(model, IAPTConfig())
    torch.manual_seed(0)
    with torch.no_grad():
        for gen in iapt.generators.values():
            torch.nn.init.normal_(gen.up.weight, std=0.05)
    iapt.save_pretrained(adapter_dir)
    return iapt.unload(), tokenizer
