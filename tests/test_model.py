"""The invariants of METHOD.md, on a tiny model of every supported family."""

from __future__ import annotations

import copy
import json

import torch

from iapt import IAPTConfig, IAPTModel, generator_parameter_count, get_iapt_model
from tests.tiny import VOCAB, left_padded_batch, make_base

ATOL = 2e-5


def iapt(family: str, seed: int = 0, **cfg) -> IAPTModel:
    cfg.setdefault("bottleneck", 8)
    model = get_iapt_model(make_base(family, seed), IAPTConfig(**cfg))
    randomize_up_projections(model)
    return model


def randomize_up_projections(model: IAPTModel) -> None:
    """The up-projection starts at zero (constant soft tokens); give it weights so tokens depend on the input."""
    with torch.no_grad():
        for gen in model.generators.values():
            torch.nn.init.normal_(gen.up.weight, std=1.0)
            if gen.up.bias is not None:
                torch.nn.init.normal_(gen.up.bias, std=0.5)


def count_generator_calls(model: IAPTModel) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for gen in model.generators.values():
        gen.register_forward_hook(hook)
    return calls


def test_left_padded_batch_matches_each_row_alone(family):
    model = iapt(family)
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        assert batch_logits.shape == (*ids.shape, VOCAB)
        for i, row in enumerate(rows):
            alone = model(row.unsqueeze(0)).logits[0]
            torch.testing.assert_close(batch_logits[i, -len(row) :], alone, atol=ATOL, rtol=1e-4)


def test_fresh_generators_write_zero_soft_tokens(family):
    """Zero-initialised up-projections: a new adapter starts from constant (zero) soft tokens, not noise."""
    model = get_iapt_model(make_base(family), IAPTConfig(bottleneck=8))
    ids, mask, _ = left_padded_batch()
    outputs = []
    for gen in model.generators.values():
        gen.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    model(ids, attention_mask=mask)
    assert outputs and all(torch.equal(o, torch.zeros_like(o)) for o in outputs)


def test_soft_tokens_change_the_output(family):
    """Guards the tests above against a no-op: the generators really steer the backbone."""
    model = iapt(family)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        with_prompts = model(ids, attention_mask=mask).logits
        for gen in model.generators.values():
            gen.up.bias.add_(10 * torch.randn_like(gen.up.bias))  # random: a constant shift is LayerNorm-invariant
        changed = model(ids, attention_mask=mask).logits
    assert (with_prompts - changed).abs().max() > 1e-3


def test_greedy_generation_cache_no_cache_and_rows_alone_agree(family):
    model = iapt(family)
    ids, mask, rows = left_padded_batch(seed=1)
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(cached[:, : ids.shape[1]], ids), "generate returns the prompt first, without slots"
    assert torch.equal(cached, uncached)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=row.unsqueeze(0), max_new_tokens=8, do_sample=False)[0]
        in_batch = cached[i, -(len(row) + 8) :]
        # a row that hits EOS early stops alone, and is padded in the batch
        assert torch.equal(in_batch[: len(alone)], alone)
        assert (in_batch[len(alone) :] == model.config.pad_token_id).all()


def test_generators_run_at_prefill_only(family):
    model = iapt(family)
    calls = count_generator_calls(model)
    ids, mask, _ = left_padded_batch()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert calls[0] == len(model.generators), "one call per layer, at prefill, none while decoding"
    calls[0] = 0
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert calls[0] == 6 * len(model.generators), "without a cache every step is a prefill"


def test_response_never_reaches_the_soft_tokens(family):
    model = iapt(family)
    captured: list[torch.Tensor] = []
    for gen in model.generators.values():
        gen.register_forward_hook(lambda _m, _a, out: captured.append(out.detach().clone()))
    torch.manual_seed(3)
    prompt = torch.randint(3, VOCAB, (2, 6))
    answers = [torch.randint(3, VOCAB, (2, 5)) for _ in range(2)]
    logits = []
    for answer in answers:
        ids = torch.cat([prompt, answer], dim=1)
        labels = ids.clone()
        labels[:, :6] = -100  # teacher forcing: the answer is labelled, the instruction is not
        logits.append(model(ids, labels=labels).logits)
    half = len(captured) // 2
    for a, b in zip(captured[:half], captured[half:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # the instruction positions see exactly the same thing whatever the answer is
    torch.testing.assert_close(logits[0][:, :6], logits[1][:, :6], atol=0, rtol=0)


def test_instruction_mask_rules(family):
    model = iapt(family)
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (1, 8))
    labels = ids.clone()
    labels[:, :5] = -100
    explicit = torch.zeros_like(ids)
    explicit[:, :5] = 1
    with torch.no_grad():
        by_labels = model(ids, labels=labels).logits
        by_mask = model(ids, instruction_mask=explicit).logits
        by_default = model(ids).logits
        wins = model(ids, labels=labels, instruction_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(by_labels, by_mask, atol=0, rtol=0)
    assert (by_default - by_mask).abs().max() > 1e-4, "without a mask every attended token is pooled"
    torch.testing.assert_close(wins, by_default, atol=0, rtol=0)


def test_only_generators_train_and_backbone_is_untouched(family):
    model = iapt(family)
    model.train()
    before = copy.deepcopy(model.base_model.state_dict())
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-3] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("generators."):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(g.down.weight.grad is not None and g.down.weight.grad.abs().sum() > 0 for g in model.generators.values())
    optimizer.step()
    after = model.base_model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_loss_matches_manual_shifted_cross_entropy(family):
    model = iapt(family)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_labelled_logits_only_gives_the_same_loss_and_gradients(family):
    model = iapt(family)
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-3] = -100
    full = model(ids, attention_mask=mask, labels=labels)
    full.loss.backward()
    grads = [p.grad.clone() for p in model.generators.parameters()]
    model.zero_grad()
    fast = model(ids, attention_mask=mask, labels=labels, labelled_logits_only=True)
    fast.loss.backward()
    assert fast.logits.shape[1] == 3, "only the positions that predict the 3 labelled tokens"
    torch.testing.assert_close(fast.loss, full.loss)
    for a, p in zip(grads, model.generators.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-4)


def test_save_and_load_give_identical_logits(family, tmp_path):
    model = iapt(family, seed=0)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["num_soft_tokens"] == 4 and saved["peft_type"] == "IAPT"
    loaded = IAPTModel.from_pretrained(make_base(family, seed=0), tmp_path)
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert loaded.get_nb_trainable_parameters()[0] == 0, "loaded for inference by default, as in PEFT"
    trainable = IAPTModel.from_pretrained(make_base(family, seed=0), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == trainable.expected_parameter_count()


def test_parameter_count_follows_the_formula(family):
    model = iapt(family, bottleneck=8, num_soft_tokens=4)
    d = model.base_model.config.get_text_config().hidden_size
    per_layer = 2 * d * 8 + 8 * 4 + 12 + (8 + d)
    assert generator_parameter_count(d, model.iapt_config) == per_layer
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer
    nobias = iapt(family, bias=False)
    assert nobias.get_nb_trainable_parameters()[0] == 2 * (2 * d * 8 + 8 * 4 + 12)


def test_base_model_alone_is_the_bare_backbone(family):
    reference = make_base(family)
    model = iapt(family)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model.base_model(ids, attention_mask=mask).logits,
            reference(ids, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )
    assert model.unload() is model.base_model


def test_sliding_window_rows_padded_past_the_window_match_each_row_alone():
    """Each row is laid out [padding | slots | tokens], as alone: with a 6-token window and rows padded by up
    to 5 tokens, the batch still equals every row alone, in logits and in cached greedy generation."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    from tests.tiny import _COMMON

    torch.manual_seed(0)
    bases = [
        Gemma3ForCausalLM(
            Gemma3TextConfig(
                **_COMMON, head_dim=12, sliding_window=6, layer_types=["sliding_attention", "full_attention"]
            )
        ),
        MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=6)),
    ]
    for base in bases:
        with torch.no_grad():
            base.get_output_embeddings().weight.mul_(8.0)  # sharper logits: greedy tokens differ when inputs do
        model = get_iapt_model(base.eval(), IAPTConfig(bottleneck=8))
        randomize_up_projections(model)
        ids, mask, rows = left_padded_batch()
        with torch.no_grad():
            batch_logits = model(ids, attention_mask=mask).logits
            generated = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
            )
            for i, row in enumerate(rows):
                alone = model(row.unsqueeze(0)).logits[0]
                torch.testing.assert_close(batch_logits[i, -len(row) :], alone, atol=ATOL, rtol=1e-4)
                own = model.generate(input_ids=row.unsqueeze(0), max_new_tokens=6, do_sample=False, pad_token_id=0)
                assert generated[i, ids.shape[1] :].tolist() == own[0, len(row) :].tolist()
                assert generated[i, -6 - len(row) : -6].tolist() == row.tolist(), "the prompt comes back, no slots"


def with_visible_pad(base):
    """Tiny models embed the pad id (the slot token) as zeros, so their slots' states would be zero anchors."""
    with torch.no_grad():
        base.get_input_embeddings().weight[0].normal_(generator=torch.Generator().manual_seed(3))
    return base


def test_anchored_fresh_adapter_is_the_backbone_with_slot_tokens_in_front(family):
    """IAPTConfig.anchor: soft tokens = the slots' own backbone states + generator output; a fresh adapter (zero
    up-projection) is then exactly the bare model reading n pad tokens first, and a trained one still keeps
    rows independent of their batch and survives save/load (the anchors are recomputed, not saved)."""
    model = get_iapt_model(with_visible_pad(make_base(family)), IAPTConfig(bottleneck=8, anchor=True))
    assert all(float(g.anchor.abs().sum()) > 0 for g in model.generators.values())
    ids, mask, rows = left_padded_batch()
    n = model.num_soft_tokens
    with torch.no_grad():
        for row in rows:
            ours = model(row.unsqueeze(0)).logits[0]
            slots = torch.full((n,), model.slot_token_id)
            bare = model.base_model(torch.cat([slots, row]).unsqueeze(0)).logits[0, n:]
            torch.testing.assert_close(ours, bare, atol=ATOL, rtol=1e-4)
    randomize_up_projections(model)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(
                batch_logits[i, -len(row) :], model(row.unsqueeze(0)).logits[0], atol=ATOL, rtol=1e-4
            )
    assert not any("anchor" in k for k in model.state_dict()), "anchors are derived from the base, never saved"


def test_anchored_adapter_save_and_load(tmp_path):
    model = get_iapt_model(with_visible_pad(make_base("llama")), IAPTConfig(bottleneck=8, anchor=True, layers=[1]))
    assert all(float(g.up.weight.detach().abs().sum()) == 0 for g in model.generators.values()), (
        "anchored slots are never zero, so a layer subset keeps the zero start"
    )
    randomize_up_projections(model)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "a")
    base = model.unload()
    loaded = IAPTModel.from_pretrained(base, tmp_path / "a")
    assert loaded.iapt_config.anchor
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, before)
