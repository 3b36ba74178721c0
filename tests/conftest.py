from __future__ import annotations

import pytest

from tests.tiny import FAMILIES


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    """Every supported decoder family, as a tiny model built in code."""
    return request.param
