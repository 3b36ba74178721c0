from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.tiny import FAMILIES


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    """Every supported decoder family, as a tiny model built in code."""
    return request.param


@pytest.fixture(scope="module")
def slot_probe():
    """benchmarks/slot_probe.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).parent.parent / "benchmarks" / "slot_probe.py"
    spec = importlib.util.spec_from_file_location("slot_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
