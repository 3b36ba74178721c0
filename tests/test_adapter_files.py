"""The one reader of adapter weights: every loader's checks, with messages naming the file and the tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from iapt.adapter_files import check_finite, header_shapes, read_weights, validate_weights, weights_path


def folder(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_good_weights_are_read_and_checked(tmp_path):
    d = folder(tmp_path, {"a": torch.ones(2, 3), "b": torch.zeros(4)})
    assert header_shapes(weights_path(d)) == {"a": (2, 3), "b": (4,)}
    state = read_weights(d, {"a": (2, 3), "b": (4,)})
    assert torch.equal(state["a"], torch.ones(2, 3))
    assert validate_weights(d, {"a": (2, 3), "b": (4,)}, finite=True) == d / "adapter_model.safetensors"


def test_each_problem_gets_its_own_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors are missing"):
        weights_path(tmp_path)
    d = folder(tmp_path, {"a": torch.ones(2, 3), "extra": torch.ones(1)})
    with pytest.raises(
        ValueError,
        match=r"missing \['b'\]; unexpected \['extra'\]; shape of a is \(2, 3\), "
        r"expected \(3, 2\)",
    ):
        read_weights(d, {"a": (3, 2), "b": (4,)})
    with pytest.raises(ValueError, match="do not match"):
        validate_weights(d, {"a": (2, 3)})
    (tmp_path / "nan").mkdir()
    bad = folder(tmp_path / "nan", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="tensor 'w' has NaN or infinite values"):
        check_finite(bad / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        read_weights(tmp_path, {})
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        validate_weights(tmp_path, {})
