"""Reading adapter weights: one reader, with the checks every loader needs (IAPT, IDPG/LPT, the serving engine).

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. A loader says which tensors of which
shapes its config implies; the reader refuses a missing or unreadable file, missing, unexpected or misshapen
tensors, and (when asked) NaN or infinite values, each with a message naming the file and the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from iapt.config import CONFIG_NAME, WEIGHTS_NAME

Shapes = Mapping[str, tuple[int, ...]]


def weights_path(directory: str | os.PathLike) -> Path:
    """The folder's weights file; a clear error when only the config is there."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter weights {path} are missing (the folder has {CONFIG_NAME} only)")
    return path


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"adapter weights {path} are corrupt or unreadable: {exc}")


def check_shapes(path: Path, found: Shapes, expected: Shapes) -> None:
    """Refuse weights whose tensor names or shapes are not the ones the config implies."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                "shape of " + ", ".join(f"{k} is {tuple(found[k])}, expected {tuple(expected[k])}" for k in wrong[:3])
                if wrong
                else "",
            )
            if part
        )
        raise ValueError(f"adapter weights {path} do not match its {CONFIG_NAME}: {detail}")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the file's header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def check_finite(path: Path, keys: list[str] | None = None) -> None:
    """Refuse NaN or infinite values, one tensor at a time (a served adapter would answer garbage or fail)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in keys if keys is not None else list(f.keys()):  # noqa: SIM118 (not a dict)
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"adapter weights {path}: tensor {key!r} has NaN or infinite values")
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def validate_weights(directory: str | os.PathLike, expected: Shapes, finite: bool = False) -> Path:
    """Check the folder's weights against ``expected`` from the header (and values, with ``finite``); no load."""
    path = weights_path(directory)
    check_shapes(path, header_shapes(path), expected)
    if finite:
        check_finite(path, sorted(expected))
    return path


def read_weights(directory: str | os.PathLike, expected: Shapes) -> dict[str, torch.Tensor]:
    """The folder's weights, checked against ``expected`` (name -> shape)."""
    path = weights_path(directory)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    check_shapes(path, {k: tuple(v.shape) for k, v in state.items()}, expected)
    return state
