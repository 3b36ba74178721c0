"""The engine on a bf16 backbone: float32 generators and anchors, the same tokens as offline generate."""

from __future__ import annotations

import torch

from iapt import IAPTConfig
from tests.tiny import served_like_offline, tiny_lm


def test_bf16_backbone_serves_like_offline_generate(tmp_path):
    configs = {name: IAPTConfig(bottleneck=4, anchor=anchor) for name, anchor in (("pad", "pad"), ("zero", "none"))}
    served_like_offline(tiny_lm().to(torch.bfloat16).eval(), tmp_path, configs, [[5, 6, 7, 8, 9], [11, 12, 13]])
