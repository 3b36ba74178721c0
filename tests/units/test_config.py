"""One adapter-config format (config.AdapterConfigMixin) for IAPT, IDPG and LPT configs."""

from __future__ import annotations

import json

import pytest

from iapt import IAPTConfig
from iapt.baselines.generated import GeneratedPromptConfig


@pytest.mark.parametrize("config", [IAPTConfig(bottleneck=8), GeneratedPromptConfig(peft_type="LPT", bottleneck=8)])
def test_every_adapter_config_round_trips_and_drops_unknown_keys_with_a_warning(config, tmp_path):
    config.save(tmp_path)
    assert type(config).load(tmp_path) == config
    data = json.loads((tmp_path / "adapter_config.json").read_text()) | {"from_the_future": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="from_the_future"):
        assert type(config).load(tmp_path) == config
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        type(config).load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter config"):
        type(config).load(tmp_path / "missing")
