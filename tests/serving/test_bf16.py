"""The engine on a bf16 backbone: float32 generators and anchors, the same tokens as offline generate."""

from __future__ import annotations

import torch

from iapt import IAPTConfig, get_iapt_model
from iapt.serving import Engine, Request
from tests.tiny import tiny_lm, tiny_tokenizer


def test_bf16_backbone_serves_like_offline_generate(tmp_path):
    base = tiny_lm().to(torch.bfloat16).eval()
    torch.manual_seed(0)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    expected = {}
    for name, anchor in (("pad", "pad"), ("zero", "none")):
        model = get_iapt_model(base, IAPTConfig(bottleneck=4, anchor=anchor))
        for g in model.generators.values():
            torch.nn.init.normal_(g.up.weight, std=0.1)
        model.save_pretrained(tmp_path / name)
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)
            expected[name, tuple(p)] = out[0, len(p) :].tolist()
        model.unload()
    engine = Engine(base, tiny_tokenizer(), tmp_path)
    try:
        requests = [Request(p, name, max_tokens=5) for name in ("pad", "zero") for p in prompts]
        for r, h in zip(requests, engine.generate_many(requests), strict=True):
            assert h.tokens == expected[r.adapter, tuple(r.prompt)], r
    finally:
        engine.close()
