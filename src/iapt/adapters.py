"""Load any adapter this project saves (IAPT or a PEFT baseline) onto its base model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from iapt import methods
from iapt.config import CONFIG_NAME


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """Accept a run folder (holding ``adapter/``) or the adapter folder itself."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    raise FileNotFoundError(f"no adapter at {path}: expected {path / CONFIG_NAME} or {path / 'adapter' / CONFIG_NAME}")


def adapter_type(path: str | os.PathLike) -> str:
    directory = resolve_adapter_dir(path)
    try:
        return json.loads((directory / CONFIG_NAME).read_text()).get("peft_type", "IAPT")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"adapter config {directory / CONFIG_NAME} is corrupt: {exc}") from None


def load_adapter(base: Any, path: str | os.PathLike) -> Any:
    """Install the adapter at ``path`` on ``base`` for inference (IAPT, IDPG, LPT or a PEFT method)."""
    directory = resolve_adapter_dir(path)
    return methods.load(base, directory, adapter_type(directory)).eval()
