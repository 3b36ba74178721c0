"""Property-based checks of the HTTP API against its own OpenAPI document (schemathesis).

A few hundred generated requests, bounded and seeded, on a tiny model behind 127.0.0.1: no 5xx, every status
and body as documented. Skipped where schemathesis is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

import pytest
import torch

from iapt.serving import Engine, create_app
from iapt.serving.app import BackgroundServer
from iapt.serving.auth import KeyRing
from tests.tiny import tiny_lm

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

torch.set_num_threads(1)
ADMIN = {"Authorization": "Bearer sk-admin"}
KEYS = {"sk-admin": {"tenant": "ops", "admin": True}, "sk-alice": {"tenant": "alice", "adapters": ["alice"]}}


@pytest.fixture(scope="module")
def fuzzed(adapters_dir, tokenizer, tmp_path_factory):
    import json

    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    engine = Engine(tiny_lm().eval(), tokenizer, adapters_dir, base_name="tiny", max_batch_size=8, max_queue=16)
    app = create_app(engine, KeyRing.from_file(keys_file), max_prompt_tokens=32, max_tokens_limit=4, max_n=2)
    with BackgroundServer(app) as srv:
        yield srv, app
    engine.close()


OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/load_adapter"),
    ("POST", "/v1/unload_adapter"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/version"),
]
EXAMPLES = {"/v1/completions": 80, "/v1/chat/completions": 80}  # the rest: 20 each; ~380 requests in all


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_api_keeps_to_its_schema(fuzzed, method, path):
    """schemathesis' default checks on valid-by-schema requests (no 5xx, status, content type, headers and
    body as documented). Driven through hypothesis directly: schemathesis' pytest plugin does not run on
    this pytest (9.x)."""
    server, app = fuzzed
    schema = schemathesis.openapi.from_dict(app.openapi())
    operation = schema[path][method]
    assert {p for p in schema} == {p for _, p in OPERATIONS}, "a new endpoint: add it to OPERATIONS"

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(
        max_examples=EXAMPLES.get(path, 20),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    def check(case) -> None:
        case.call_and_validate(base_url=server.url, headers=ADMIN, timeout=30, excluded_checks=excluded)

    # A schema cannot say "a folder holding an adapter for this base": a well-formed lora_path that is not
    # one is a 400, which the positive-data check would count against the server.
    excluded = [positive_data_acceptance] if path in ("/v1/load_adapter", "/v1/load_lora_adapter") else []

    check()
