"""adapters.py: any saved adapter folder (or the run folder holding it) loads onto its base, for inference."""

from __future__ import annotations

import pytest
import torch

from iapt import IAPTConfig, get_iapt_model
from iapt.adapters import adapter_type, load_adapter, resolve_adapter_dir
from tests.test_model import randomize_up_projections
from tests.tiny import left_padded_batch, make_base


def test_a_run_folder_or_its_adapter_folder_loads_the_same_model(tmp_path):
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=4))
    randomize_up_projections(model)
    model.save_pretrained(tmp_path / "run" / "adapter")
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    assert resolve_adapter_dir(tmp_path / "run") == tmp_path / "run" / "adapter"
    assert adapter_type(tmp_path / "run") == "IAPT"
    loaded = load_adapter(make_base("llama"), tmp_path / "run")
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


def test_missing_corrupt_and_unknown_adapters_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        resolve_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="corrupt"):
        adapter_type(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "DORA_XL"}')
    with pytest.raises(ValueError, match="cannot load; known types"):
        load_adapter(make_base("llama"), tmp_path)
