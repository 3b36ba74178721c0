"""Baselines of the paper, trained and saved like IAPT (filled in by the baselines work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_baseline(cfg: Any, base: Any) -> Any:
    raise ValueError(f"unknown method {cfg.method!r}; this version trains only 'iapt'")


def load_baseline(base: Any, directory: Path, kind: str) -> Any:
    raise ValueError(f"adapter {directory} is of type {kind!r}, which this version cannot load (only IAPT)")
