"""The engine's invariant: a request's tokens never depend on which other requests share its batch."""

from __future__ import annotations

import shutil

import pytest
import torch

from iapt import IAPTModel
from iapt.backbone import anchor_states
from iapt.serving import Engine, QueueFull, Request, UnknownAdapter
from iapt.serving.engine import AdapterBank, read_adapter
from tests.tiny import tiny_lm

torch.set_num_threads(1)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (count,), generator=g).tolist()
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def engine(adapters_dir, tokenizer):
    eng = Engine(tiny_lm().eval(), tokenizer, adapters_dir, max_batch_size=4, max_queue=8)
    yield eng
    eng.close()


def expected(reference, adapters_dir, request: Request) -> list[int]:
    path = None if request.adapter is None else adapters_dir / request.adapter
    return reference(path, request.prompt, request.max_tokens)


def test_stacked_generators_equal_each_tenants_own(adapters_dir):
    """One soft_prompts call over a mixed batch == every row's own PromptGenerator."""
    base = tiny_lm().eval()
    names = ["alice", "bob", "carol"]
    read = [read_adapter(base, adapters_dir / n) for n in names]
    anchors = {a.name: s for a in read if (s := anchor_states(base, a.config)) is not None}
    assert anchors, "the fixture's adapters use the default (anchored) start"
    bank = AdapterBank(read, 32, 2, torch.device("cpu"), anchors)
    rows = ["alice", None, "bob", "carol", "alice"]
    index = torch.tensor([bank.index.get(r, 0) if r else 0 for r in rows])
    hidden = torch.randn(len(rows), 9, 32) * 3
    mask = torch.ones(len(rows), 9, dtype=torch.bool)
    mask[1, :4] = mask[3, :2] = mask[4, :6] = False  # left padding
    for layer in range(2):
        out, present = bank.soft_prompts(layer, index, hidden, mask, num_soft_tokens=4)
        assert not torch.allclose(out[0], out[4]), "soft tokens depend on the instruction"
        for i, name in enumerate(rows):
            if name is None or (name == "bob" and layer == 0):
                assert not present[i]
                continue
            assert present[i]
            model = IAPTModel.from_pretrained(base, adapters_dir / name)
            generator = model.generators[str(layer)]
            own = generator(hidden[i : i + 1], mask[i : i + 1])[0] + generator.anchor  # what the slots receive
            model.unload()
            n = own.shape[0]
            torch.testing.assert_close(out[i, :n], own, atol=1e-5, rtol=1e-5)


def test_bank_grown_and_shrunk_equals_a_fresh_bank(adapters_dir):
    """extended()/without() (run-time load and unload) give each tenant the soft tokens of a bank built at once,
    whatever the order, although the tenants differ in bottleneck, slot count and layers."""
    base = tiny_lm().eval()
    read = {n: read_adapter(base, adapters_dir / n) for n in ("alice", "bob", "carol")}
    anchors = {n: anchor_states(base, a.config) for n, a in read.items()}
    fresh = AdapterBank([read["alice"], read["carol"]], 32, 2, torch.device("cpu"), anchors)
    grown = AdapterBank([], 32, 2, torch.device("cpu")).extended([read["carol"]], anchors)
    grown = grown.extended([read["bob"]], anchors).extended([read["alice"]], anchors).without("bob")
    assert grown.names == ["carol", "alice"] and set(grown.index) == {"carol", "alice"}
    hidden, mask = torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.bool)
    for layer in range(2):
        for name in ("alice", "carol"):
            a = fresh.soft_prompts(layer, torch.tensor([fresh.index[name]] * 3), hidden, mask, 4)
            b = grown.soft_prompts(layer, torch.tensor([grown.index[name]] * 3), hidden, mask, 4)
            torch.testing.assert_close(a, b)
    assert grown.without("carol").without("alice").names == []


def test_folder_load_builds_the_bank_once_and_keeps_one_copy(adapters_dir, tokenizer, monkeypatch):
    built = []
    original = AdapterBank.extended
    monkeypatch.setattr(
        AdapterBank,
        "extended",
        lambda self, adapters, anchors=None: built.append(len(adapters)) or original(self, adapters, anchors),
    )
    eng = Engine(tiny_lm().eval(), tokenizer, adapters_dir)
    try:
        assert built == [3], "one bank build for the whole folder"
        assert not any(isinstance(v, torch.Tensor) for a in eng.adapters.values() for v in vars(a).values()), (
            "the weights live in the bank only"
        )
        assert eng.bank.names == sorted(eng.adapters)
    finally:
        eng.close()


def test_mixed_tenants_in_one_batch_match_offline_generate(engine, reference, adapters_dir):
    names = ["alice", "bob", None, "carol", "alice", None, "bob"]
    requests = [Request(p, a, max_tokens=10) for p, a in zip(prompts(len(names)), names, strict=True)]
    engine.max_batch_size = len(requests)
    handles = engine.generate_many(requests)
    for r, h in zip(requests, handles, strict=True):
        assert h.tokens == expected(reference, adapters_dir, r), r.adapter
        assert h.finish_reason in ("stop", "length")
    # Guard against a no-op: the same prompt gives different tokens under different tenants.
    p = prompts(1, seed=5)[0]
    outs = {a: engine.generate_many([Request(p, a, max_tokens=8)])[0].tokens for a in ("alice", "bob", "carol", None)}
    assert len({tuple(t) for t in outs.values()}) == 4, outs


def test_staggered_arrivals_join_mid_decode(engine, reference, adapters_dir):
    """Requests join between decode steps, queue when the batch is full, leave when done."""
    names = ["alice", None, "bob", "carol", "alice", "bob", None, "carol", "alice"]
    lengths = [12, 3, 9, 1, 7, 12, 5, 10, 2]
    requests = [Request(p, a, max_tokens=t) for p, a, t in zip(prompts(9, seed=1), names, lengths, strict=True)]
    handles = [engine.submit(r) for r in requests[:2]]
    for r in requests[2:]:
        engine.step()
        engine.step()
        handles.append(engine.submit(r))
        assert engine.stats()["running"] <= engine.max_batch_size
    while not all(h.finished for h in handles):
        engine.step()
    for r, h in zip(requests, handles, strict=True):
        assert h.tokens == expected(reference, adapters_dir, r), r.adapter
    assert engine.stats()["running"] == 0 and engine._running is None


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    p = prompts(1, seed=3)[0]
    alone = engine.generate_many([Request(p, "alice", max_tokens=8, temperature=1.0, seed=7)])[0].tokens
    crowd = engine.generate_many(
        [
            Request(q, a, max_tokens=6, temperature=0.8, seed=1)
            for q, a in zip(prompts(3, seed=4), ["bob", None, "carol"], strict=True)
        ]
        + [Request(p, "alice", max_tokens=8, temperature=1.0, seed=7)]
    )
    assert crowd[-1].tokens == alone


def test_bad_request_fails_alone(engine, reference, adapters_dir, monkeypatch):
    """A request that breaks the prefill fails by itself; its batch neighbours are served unchanged."""
    good = [Request(p, a, max_tokens=6) for p, a in zip(prompts(2, seed=2), ["alice", None], strict=True)]
    monkeypatch.setattr(engine, "_validate", lambda r: None)  # let an out-of-vocabulary id reach the model
    handles = [engine.submit(good[0]), engine.submit(Request([5, 10_000], "bob", max_tokens=6)), engine.submit(good[1])]
    while not all(h.finished for h in handles):
        engine.step()
    assert handles[1].finish_reason == "error" and handles[1].tokens == []
    for r, h in zip(good, (handles[0], handles[2]), strict=True):
        assert h.tokens == expected(reference, adapters_dir, r)


def test_validation_and_queue_bound(engine):
    with pytest.raises(UnknownAdapter):
        engine.submit(Request([5], "nobody"))
    for bad in (Request([]), Request([5, 999]), Request([5], max_tokens=0), Request([5] * 100, max_tokens=100)):
        with pytest.raises(ValueError):
            engine.submit(bad)
    for _ in range(engine.max_queue):
        engine.submit(Request([5, 6]))
    with pytest.raises(QueueFull):
        engine.submit(Request([5, 6]))


def test_cancel_frees_the_row(engine):
    engine.max_batch_size = 1
    first = engine.submit(Request([5, 6, 7], "alice", max_tokens=50, ignore_eos=True))
    second = engine.submit(Request([8, 9], "bob", max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.stats() | {} and engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    first.cancel()
    while not second.finished:
        engine.step()
    assert first.finish_reason == "cancelled" and len(first.tokens) < 50
    assert second.finish_reason == "length" and len(second.tokens) == 3


def test_load_unload_at_run_time(engine, adapters_dir, wrong_base_adapter, reference):
    with pytest.raises(ValueError, match="trained on a base"):
        engine.load_adapter("mallory", wrong_base_adapter)
    assert "mallory" not in engine.adapters
    engine.load_adapter("alice2", adapters_dir / "alice")
    r = Request(prompts(1, seed=6)[0], "alice2", max_tokens=6)
    assert engine.generate_many([r])[0].tokens == reference(adapters_dir / "alice", r.prompt, 6)
    # Unloading: a running request finishes (decoding needs no adapter), a queued one fails cleanly.
    engine.max_batch_size = 1
    running = engine.submit(Request([5, 6, 7], "bob", max_tokens=5, ignore_eos=True))
    queued = engine.submit(Request([5, 6, 7], "bob", max_tokens=5))
    engine.step()
    engine.unload_adapter("bob")
    while not (running.finished and queued.finished):
        engine.step()
    assert running.finish_reason == "length" and len(running.tokens) == 5
    assert queued.finish_reason == "error" and "unloaded" in queued.error
    with pytest.raises(UnknownAdapter):
        engine.submit(Request([5], "bob"))


def test_startup_skips_a_wrong_base_adapter(adapters_dir, wrong_base_adapter, tmp_path, tokenizer):
    (tmp_path / "ok").symlink_to(adapters_dir / "alice", target_is_directory=True)
    (tmp_path / "mallory").symlink_to(wrong_base_adapter, target_is_directory=True)
    eng = Engine(tiny_lm().eval(), tokenizer, tmp_path)
    try:
        assert set(eng.adapters) == {"ok"}
        assert "trained on a base" in eng.load_errors["mallory"]
        assert eng.generate_many([Request([5, 6], "ok", max_tokens=2)])[0].finish_reason in ("stop", "length")
    finally:
        eng.close()


def test_generators_run_once_per_layer_at_prefill_only(engine, monkeypatch):
    """A mixed batch runs every tenant's generator in one stacked call per layer; decoding runs none."""
    import iapt.serving.bank as engine_module  # where the bank looks soft_prompts up

    calls = []
    stacked = engine_module.soft_prompts

    def counting(hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return stacked(hidden, *args, **kwargs)

    monkeypatch.setattr(engine_module, "soft_prompts", counting)
    names = ["alice", "bob", None, "alice", "bob"]  # one pooling mode: one call per layer
    engine.max_batch_size = len(names)
    engine.generate_many([Request(p, a, max_tokens=6) for p, a in zip(prompts(5), names, strict=True)])
    assert calls == [5, 5], calls  # 2 layers; every row of the batch in each call
    calls.clear()
    engine.generate_many([Request(p, a, max_tokens=6) for p, a in zip(prompts(2), ["alice", "carol"], strict=True)])
    assert sorted(calls) == [1, 1, 1, 1], calls  # two pooling modes: one call per mode and layer


SLIDING = {"gemma3-window-6": "gemma3", "mistral-window-6": "mistral"}  # tiny models with a 6-token window


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", *SLIDING])
def test_every_family_and_sliding_windows(family, tmp_path):
    """Rows keep the layout they would have alone, so even sliding-window distances match."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    from tests.serving.conftest import save_adapter
    from tests.tiny import _COMMON, make_base

    if family in SLIDING:
        torch.manual_seed(0)
        if SLIDING[family] == "gemma3":
            base = Gemma3ForCausalLM(
                Gemma3TextConfig(
                    **_COMMON, head_dim=12, sliding_window=6, layer_types=["sliding_attention", "full_attention"]
                )
            )
        else:
            base = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=6))
        with torch.no_grad():
            base.get_output_embeddings().weight.mul_(8.0)
        base.eval()
    else:
        base = make_base(family)
    save_adapter(base, tmp_path / "a", 1, bottleneck=8, num_soft_tokens=4)
    save_adapter(base, tmp_path / "b", 2, bottleneck=4, num_soft_tokens=2, layers=[1])
    engine = Engine(base, None, tmp_path, max_batch_size=3)
    try:
        names = ["a", "b", None, "b", "a"]
        requests = [
            Request([min(t, 95) for t in p], a, max_tokens=8) for p, a in zip(prompts(5, seed=8), names, strict=True)
        ]
        requests[3].prompt = requests[3].prompt * 2  # longer than the window
        handles = [engine.submit(r) for r in requests[:2]]
        engine.step()
        handles += [engine.submit(r) for r in requests[2:]]
        while not all(h.finished for h in handles):
            engine.step()
        assert_offline_equal(base, tmp_path, requests, handles)
    finally:
        engine.close()


def assert_offline_equal(base, adapters_dir, requests, handles, new_tokens: int = 8) -> None:
    """Every request's tokens equal greedy offline generation with its adapter alone (or the bare base)."""
    for r, h in zip(requests, handles, strict=True):
        ids = torch.tensor([r.prompt])
        if r.adapter is None:
            out = base.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        else:
            model = IAPTModel.from_pretrained(base, adapters_dir / r.adapter)
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            model.unload()
        assert h.tokens == out[0, len(r.prompt) :].tolist(), r.adapter


def test_read_adapter_names_bad_weights_without_loading_them(adapters_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_lm().eval()
    for damage, message in (("truncate", "corrupt or unreadable"), ("drop", "missing"), ("reshape", "shape of")):
        bad = tmp_path / damage
        shutil.copytree(adapters_dir / "alice", bad)
        weights = bad / "adapter_model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            state = load_file(weights)
            key = sorted(state)[0]
            if damage == "drop":
                del state[key]
            else:
                state[key] = torch.zeros(3, 3)
            save_file(state, weights)
        with pytest.raises(ValueError, match=message):
            read_adapter(base, bad)


def test_anchored_adapters_serve_like_offline_generate(tmp_path, tokenizer):
    """IAPTConfig.anchor rows get the slots' backbone states added, other rows of the same batch do not."""
    from iapt import IAPTConfig, get_iapt_model
    from tests.serving.conftest import save_adapter

    base = tiny_lm().eval()
    with torch.no_grad():  # tiny_lm embeds the pad id (the slot token) as zeros: give the slots a state
        base.get_input_embeddings().weight[0].normal_(generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # small generator outputs: the anchors dominate, so serving without them would show
    anchored = get_iapt_model(base, IAPTConfig(bottleneck=8, anchor=True))
    for generator in anchored.generators.values():
        torch.nn.init.normal_(generator.up.weight, std=0.05)
    anchored.save_pretrained(tmp_path / "anchored")
    anchored.unload()
    on_tokens = get_iapt_model(base, IAPTConfig(bottleneck=8, anchor="tokens", num_soft_tokens=3))
    for generator in on_tokens.generators.values():
        torch.nn.init.normal_(generator.up.weight, std=0.05)
    on_tokens.save_pretrained(tmp_path / "on-tokens")  # its own anchor ids: per-tenant anchors in one bank
    on_tokens.unload()
    save_adapter(base, tmp_path / "plain", 12, bottleneck=8, anchor="none")  # the zero start beside them
    engine = Engine(base, tokenizer, tmp_path, max_batch_size=5)
    try:
        requests = [
            Request(p, a, max_tokens=8)
            for p, a in zip(prompts(5, seed=3), ["anchored", "plain", None, "on-tokens", "anchored"], strict=True)
        ]
        handles = engine.generate_many(requests)
        assert_offline_equal(base, tmp_path, requests, handles)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ red-team regressions
def test_tiny_temperatures_are_greedy_and_fail_no_one(engine, reference, adapters_dir):
    """temperature 1e-37 overflowed float32 in the shared step and failed a neighbour's greedy request."""
    p = prompts(3, seed=11)
    greedy = Request(p[0], "alice", max_tokens=6)
    handles = engine.generate_many(
        [
            greedy,
            Request(p[1], "bob", max_tokens=6, temperature=1e-37, seed=1),
            Request(p[2], None, max_tokens=6, temperature=5e-324, seed=2),
        ]
    )
    assert [h.finish_reason for h in handles] == ["length"] * 3, [h.error for h in handles]
    assert handles[0].tokens == expected(reference, adapters_dir, greedy)
    assert handles[1].tokens == expected(reference, adapters_dir, Request(p[1], "bob", max_tokens=6))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            engine.submit(Request([5], temperature=bad))


def test_a_row_with_non_finite_logits_fails_alone(engine, reference, adapters_dir, monkeypatch):
    """Sampling is per row: one row's NaN logits fail its own request, never the batch."""
    forward = engine.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs["input_ids"].shape == (2, 1):  # a decode step with both rows
            out.logits[1] = float("nan")
        return out

    monkeypatch.setattr(engine.model, "forward", poisoned)
    p = prompts(2, seed=12)
    greedy = Request(p[0], "alice", max_tokens=6, ignore_eos=True)
    handles = engine.generate_many(
        [greedy, Request(p[1], "carol", max_tokens=6, temperature=0.9, seed=3, ignore_eos=True)]
    )
    assert handles[0].finish_reason == "length" and handles[0].tokens == expected(reference, adapters_dir, greedy)
    assert handles[1].finish_reason == "error" and handles[1].code == "invalid_output" and "finite" in handles[1].error


def test_seed_out_of_range_is_refused(engine):
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            engine.submit(Request([5], temperature=1.0, seed=seed))
    assert engine.generate_many([Request([5, 6], temperature=1.0, seed=2**64 - 1, max_tokens=2)])[0].tokens


def test_request_queued_for_an_unloaded_adapter_says_model_not_found(engine):
    queued = engine.submit(Request([5, 6, 7], "bob", max_tokens=3))
    engine.unload_adapter("bob")
    engine.step()
    assert queued.finish_reason == "error" and queued.code == "model_not_found"


def test_non_finite_adapter_weights_are_refused_at_load(adapters_dir, tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(adapters_dir / "alice", bad)
    weights = bad / "adapter_model.safetensors"
    state = load_file(weights)
    state["1.up.weight"][0, 0] = float("nan")
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"tensor '1\.up\.weight' has NaN or infinite values"):
        read_adapter(tiny_lm().eval(), bad)
    eng = Engine(tiny_lm().eval(), tokenizer, tmp_path)
    try:
        assert "nan" not in eng.adapters and "NaN" in eng.load_errors["nan"]
    finally:
        eng.close()


def test_adapter_size_limits_and_the_bank_shrinks_on_unload(engine, adapters_dir, tmp_path, reference):
    """A huge adapter is refused (the limit named); one under the limits is loaded, and its unload gives the
    bank's memory back: the bank is again the size of one built from the remaining adapters."""
    from tests.serving.conftest import save_adapter

    base = tiny_lm()
    save_adapter(base, tmp_path / "huge", 5, bottleneck=2048)
    save_adapter(base, tmp_path / "many", 6, bottleneck=8, num_soft_tokens=80)
    save_adapter(base, tmp_path / "wide", 7, bottleneck=256, num_soft_tokens=16)
    with pytest.raises(ValueError, match="r=2048; this server's limit is max_bottleneck=512"):
        engine.load_adapter("huge", tmp_path / "huge")
    with pytest.raises(ValueError, match="80 soft tokens; this server's limit is max_soft_tokens=64"):
        engine.load_adapter("many", tmp_path / "many")

    def size(bank: AdapterBank) -> int:
        return sum(t.numel() for layer in bank.layers for t in layer.values())

    before = size(engine.bank)
    engine.load_adapter("wide", tmp_path / "wide")
    assert engine.bank.layers[0]["up_weight"].shape[-1] == 256 and size(engine.bank) > 10 * before
    engine.unload_adapter("wide")
    assert size(engine.bank) == before and engine.bank.layers[0]["queries"].shape[1:] == (8, 4)
    r = Request(prompts(1, seed=13)[0], "carol", max_tokens=6)
    assert engine.generate_many([r])[0].tokens == expected(reference, adapters_dir, r)


def test_step_observers_see_every_step_with_its_rows_and_can_be_removed(engine):
    """The public hook benchmarks use instead of patching the engine: before/after every prefill and decode."""
    seen = []
    remove = engine.add_step_observer(
        lambda kind, requests, seconds: seen.append((kind, [r.adapter for r in requests], seconds))
    )
    requests = [
        Request([5, 6, 7], "alice", max_tokens=3, ignore_eos=True),
        Request([8, 9], None, max_tokens=3, ignore_eos=True),
    ]
    engine.generate_many(requests)
    kinds = [k for k, _, s in seen if s is None]
    assert kinds[0] == "prefill" and kinds.count("prefill") == 1 and kinds.count("decode") == 2
    assert [k for k, _, s in seen if s is not None] == kinds, "every step is seen before and after"
    assert all(s is None or s >= 0 for _, _, s in seen)
    assert seen[0][1] == ["alice", None], "the step's rows, in order"
    remove()
    seen.clear()
    engine.generate_many([Request([5], "bob", max_tokens=2)])
    assert seen == []
