"""The baselines (LoRA, prompt tuning, prefix tuning, IDPG, LPT) on tiny models built in code."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from iapt import methods
from iapt.adapters import load_adapter
from iapt.baselines import BASELINES, GeneratedPromptConfig, GeneratedPromptModel
from iapt.methods import count_for, known_methods, size_for, size_for_budget
from iapt.training import TrainConfig
from tests.tiny import VOCAB, left_padded_batch, make_base

METHODS = {m.name: m for m in BASELINES}  # this file tests the baselines; IAPT has its own files
ATOL = 2e-5
SMALL = {"bottleneck": 4, "num_soft_tokens": 2}  # IDPG / LPT sizes for fast tests
PEFT_TYPES = {"lora": "LORA", "prompt-tuning": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "idpg": "IDPG", "lpt": "LPT"}


def build(method: str, family: str = "llama", seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    return methods.build(TrainConfig(method=method, **{**SMALL, **cfg}), make_base(family, seed))


def perturb(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Fresh adapters can be a no-op (LoRA's B = 0): give every trainable weight a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def training_batch() -> dict[str, torch.Tensor]:
    """The left-padded rows, the first three real tokens of each being the instruction (labels -100)."""
    ids, mask, rows = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    for i, row in enumerate(rows):
        start = ids.shape[1] - len(row)
        labels[i, start : start + 3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------ registry
def test_registry_lists_the_methods_and_refuses_unknown_ones():
    assert known_methods() == ["iapt", "lora", "prompt-tuning", "prefix", "idpg", "lpt"]
    with pytest.raises(ValueError, match="unknown method 'nope'.*iapt, lora, prompt-tuning, prefix, idpg, lpt"):
        methods.build(TrainConfig(method="nope"), make_base("llama"))
    with pytest.raises(ValueError, match="known methods"):
        count_for("adapter", make_base("llama"), 4)
    with pytest.raises(ValueError, match="cannot load; known types"):
        methods.load(make_base("llama"), "somewhere", "IA3")


def test_default_sizes_without_a_budget():
    base = make_base("llama")
    expected = {"lora": 8, "prompt-tuning": 20, "prefix": 10, "idpg": 32, "lpt": 32}
    for method, size in expected.items():
        assert size_for(TrainConfig(method=method), base) == size
    assert size_for(TrainConfig(method="lpt", bottleneck=12), base) == 12


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_budget_picks_the_closest_size_and_the_count_is_exact(family):
    base = make_base(family)
    for method in METHODS:
        cfg = TrainConfig(method=method, **SMALL)
        counts = {s: count_for(method, base, s, cfg) for s in range(1, 4)}
        for budget in (1, 500, 3_333, 20_000, 123_457):
            size = 1
            while count_for(method, base, size, cfg) <= budget:  # brute force over every size up to the budget
                size += 1
                counts.setdefault(size, count_for(method, base, size, cfg))
            best = min((s for s in counts if s <= size), key=lambda s: (abs(counts[s] - budget), s))
            assert size_for_budget(method, base, budget, cfg) == best, (method, budget)
        for size in (1, 3):  # the count formula is what the built model really trains
            torch.manual_seed(0)
            model = METHODS[method].build(make_base(family), size, cfg)
            assert sum(p.numel() for p in trainable(model).values()) == counts[size], (method, size)


def test_budget_reaches_the_trainer_config():
    base = make_base("llama")
    cfg = TrainConfig(method="lora", budget=5_000)
    model = methods.build(cfg, base)
    rank = size_for_budget("lora", make_base("llama"), 5_000)
    assert model.peft_model.active_peft_config.r == rank
    assert sum(p.numel() for p in trainable(model).values()) == count_for("lora", make_base("llama"), rank)


def test_lora_targets_q_and_v_or_gpt2_c_attn():
    lora = build("lora")
    names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trainable(lora)}
    assert names == {"q_proj", "v_proj"}
    gpt2 = build("lora", "gpt2")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trainable(gpt2)} == {"c_attn"}


# ------------------------------------------------------------------------------------------ training, save, load
@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "prefix"])
def test_peft_save_asks_no_hub(method, tmp_path, monkeypatch):
    """A base named like a Hub id must not make PEFT look it up online at save time (no network at run time)."""
    import peft.utils.save_and_load as peft_save

    def no_network(*args, **kwargs):
        raise AssertionError("save_pretrained asked the Hub")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_network)
    model = methods.build(TrainConfig(method=method, **SMALL), make_base("llama"))
    model.peft_model.peft_config["default"].base_model_name_or_path = "someone/not-here"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's "Could not find a config file" warning included
        model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", list(METHODS))
def test_train_steps_save_and_reload(method, tmp_path):
    torch.manual_seed(0)
    base = make_base("llama")
    frozen = [(p, p.detach().clone()) for p in base.parameters()]
    model = methods.build(TrainConfig(method=method, **SMALL), base)
    params = trainable(model)
    assert params and not {id(p) for p in params.values()} & {id(p) for p, _ in frozen}
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(**training_batch())
        assert out.logits.shape == (3, 9, VOCAB)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(before[k], p) for k, p in params.items()), "every adapter weight trains"
    assert all(torch.equal(p, saved) for p, saved in frozen), "the backbone stays bit-for-bit unchanged"
    assert all(p.grad is None for p, _ in frozen)

    model.eval()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(make_base("llama"), tmp_path / "adapter")
    assert not reloaded.training
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in reloaded.parameters()), "a loaded adapter is for inference"


# ------------------------------------------------------------------------------------------ padding, generate
@pytest.mark.parametrize("method", list(METHODS))
def test_left_padding_and_generate_match_each_row_alone(method, family):
    model = build(method, family).eval()
    perturb(model)
    ids, mask, rows = left_padded_batch()
    kw = {
        "max_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (*ids.shape, VOCAB)
        batch = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert batch.sequences.shape == (3, ids.shape[1] + 4)
        assert torch.equal(batch.sequences[:, : ids.shape[1]], ids), "generate returns the prompt, then new tokens"
        for i, row in enumerate(rows):
            alone = model(input_ids=row.unsqueeze(0)).logits[0]
            torch.testing.assert_close(logits[i, -len(row) :], alone, atol=ATOL, rtol=1e-4)
            single = model.generate(
                input_ids=row.unsqueeze(0), attention_mask=torch.ones(1, len(row), dtype=torch.long), **kw
            )
            new = single.sequences[0, len(row) :]  # stops early at EOS; the batch row then pads
            assert torch.equal(new, batch.sequences[i, ids.shape[1] : ids.shape[1] + len(new)])
            assert (batch.sequences[i, ids.shape[1] + len(new) :] == 0).all()
            for a, b in zip(single.scores, batch.scores):
                torch.testing.assert_close(a[0], b[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "idpg", "lpt"])
def test_generation_with_and_without_cache_agree(method):
    model = build(method).eval()
    perturb(model)
    ids, mask, _ = left_padded_batch()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw))
    beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, **kw)
    assert beams.shape == cached.shape


def test_prefix_tuning_refuses_generation_without_cache():
    """PEFT 0.21 prefix tuning breaks without the KV cache (attention shape error): refused clearly."""
    model = build("prefix").eval()
    ids, mask, _ = left_padded_batch()
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, use_cache=False, pad_token_id=0)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_raw_peft_prompt_learning_misplaces_left_padded_rows(kind):
    """Why PeftBaseline derives positions from the mask: bare PEFT scores a left-padded row differently.

    If this test fails, PEFT has fixed it and the position hook in ``peft_methods`` could go.
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    config_cls = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    raw = get_peft_model(make_base("llama"), config_cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)).eval()
    perturb(raw)
    ids, mask, rows = left_padded_batch()
    m = 3 if kind == "prompt" else 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = raw(input_ids=ids, attention_mask=mask).logits[:, m:]
        alone = raw(input_ids=rows[0].unsqueeze(0)).logits[0, m:]
    assert (logits[0, -len(rows[0]) :] - alone).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ LPT, IDPG specifics
def lpt(family: str = "llama", **cfg) -> GeneratedPromptModel:
    torch.manual_seed(0)
    model = GeneratedPromptModel(make_base(family), GeneratedPromptConfig(peft_type="LPT", **{**SMALL, **cfg})).eval()
    perturb(model, scale=1.0)
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_lpt_slots_do_not_exist_below_the_insertion_layer(impl):
    """Real tokens below layer k see exactly what the bare backbone sees; what the slots hold there is moot."""
    model = lpt()
    model.base_model.config._attn_implementation = impl
    bare = make_base("llama")
    bare.config._attn_implementation = impl
    k = model.insertion_layer
    assert k == 1  # L // 2 of the 2-layer tiny model
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        for row in rows:
            mine = model(input_ids=row.unsqueeze(0), output_hidden_states=True).hidden_states
            theirs = bare(input_ids=row.unsqueeze(0), output_hidden_states=True).hidden_states
            for layer in range(k + 1):  # hidden_states[l] enters layer l: rotary models ignore the slot offset
                torch.testing.assert_close(mine[layer], theirs[layer], atol=1e-6, rtol=1e-6)
            assert (mine[k + 1] - theirs[k + 1]).abs().max() > 1e-2, "the late prompt acts from layer k on"
        before = model(input_ids=ids, attention_mask=mask).logits
        model.slot_token_id = 17  # other slot contents below layer k: no effect anywhere
        after = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(after[keep], before[keep], atol=0, rtol=0)


def test_lpt_reads_the_hidden_states_at_its_layer():
    model = lpt()
    seen = []
    model.prompt_generator.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    row = left_padded_batch()[2][2]
    with torch.no_grad():
        model(input_ids=row.unsqueeze(0))
        states = make_base("llama")(input_ids=row.unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[0], states[model.insertion_layer], atol=1e-6, rtol=1e-6)


def test_lpt_refuses_attention_without_masks():
    base = make_base("llama")
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        GeneratedPromptModel(base, GeneratedPromptConfig(peft_type="LPT"))


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "adaptive-mean", "adaptive-max"])
def test_lpt_poolings_pool_the_instruction_only(pooling):
    model = lpt(pooling=pooling)
    ids, mask, _rows = left_padded_batch()
    instruction = mask.clone()
    instruction[:, -2:] = 0  # the last two tokens are the "response"
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, instruction_mask=instruction).logits
        changed = ids.clone()
        changed[:, -2:] = (changed[:, -2:] + 1) % VOCAB
        out2 = model(input_ids=changed, attention_mask=mask, instruction_mask=instruction).logits
    # positions before the changed tokens see the same soft tokens and the same tokens: identical
    torch.testing.assert_close(
        out[:, :-2][mask[:, :-2].bool()], out2[:, :-2][mask[:, :-2].bool()], atol=1e-6, rtol=1e-6
    )
    assert sum(p.numel() for p in model.prompt_generator.parameters()) == model.expected_parameter_count()


def test_adaptive_pooling_matches_torch():
    from iapt.baselines.generated import _segments

    x = torch.randn(1, 7, 5)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    member = _segments(keep, 3).float()
    mine = (member.transpose(1, 2) @ x) / member.sum(1).unsqueeze(-1)
    theirs = torch.nn.functional.adaptive_avg_pool1d(x[:, 2:].transpose(1, 2), 3).transpose(1, 2)
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("source", ["embeddings", "last_layer"])
def test_idpg_writes_input_layer_prompts_from_the_instruction(source, tmp_path):
    torch.manual_seed(0)
    base = make_base("llama")
    model = GeneratedPromptModel(base, GeneratedPromptConfig(peft_type="IDPG", source=source, **SMALL)).eval()
    perturb(model, scale=1.0)
    assert model.insertion_layer == 0
    seen = []
    model.prompt_generator.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    ids, mask, rows = left_padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        row = rows[2].unsqueeze(0)
        model(input_ids=row)
        bare = make_base("llama")(input_ids=row, output_hidden_states=True).hidden_states
        reference = bare[0] if source == "embeddings" else bare[-1]
        torch.testing.assert_close(seen[-1], reference, atol=1e-5, rtol=1e-5)
        if source == "embeddings":
            torch.testing.assert_close(seen[-1], base.get_input_embeddings()(row))
        for i, r in enumerate(rows):
            torch.testing.assert_close(
                logits[i, -len(r) :], model(input_ids=r.unsqueeze(0)).logits[0], atol=ATOL, rtol=1e-4
            )
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        beams = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0
        )
        assert gen.shape == beams.shape == (3, ids.shape[1] + 4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["source"] == source
    again = load_adapter(make_base("llama"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=ids, attention_mask=mask).logits[mask.bool()], logits[mask.bool()], atol=1e-6, rtol=1e-6
        )


@pytest.mark.parametrize("method", ["idpg", "lpt", "lora"])
def test_a_base_of_another_shape_is_refused(method, tmp_path):
    model = build(method)
    model.save_pretrained(tmp_path)
    other = make_base("qwen2") if method != "lora" else make_base("gpt2")
    if method != "lora":
        with pytest.raises(ValueError, match=r"model_type\) 'llama'.*this base model has .* 'qwen2'"):
            load_adapter(other, tmp_path)
        from transformers import LlamaConfig, LlamaForCausalLM

        wider = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        with pytest.raises(ValueError, match="hidden size 48 .* hidden size 64"):
            load_adapter(wider, tmp_path)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        wider = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        with pytest.raises(ValueError, match="does not fit this base model"):
            load_adapter(wider, tmp_path)


def test_unload_gives_the_bare_backbone_back():
    ids, mask, _ = left_padded_batch()
    for method in METHODS:
        reference = make_base("llama")
        model = build(method)
        perturb(model)
        bare = model.unload()
        with torch.no_grad():
            torch.testing.assert_close(
                bare(input_ids=ids, attention_mask=mask).logits,
                reference(input_ids=ids, attention_mask=mask).logits,
                atol=0,
                rtol=0,
            )


# ------------------------------------------------------------------------------------------ budgets at scale
def test_iapt_counts_agree_with_the_trainer_and_the_model():
    from iapt import IAPTConfig, get_iapt_model
    from iapt.training.trainer import build_model

    base = make_base("llama")
    for budget in (900, 5_000, 20_000):
        cfg = TrainConfig(budget=budget, num_soft_tokens=3)
        r = size_for_budget("iapt", base, budget, cfg)
        brute = min(range(1, 4 * 48 + 1), key=lambda s: (abs(count_for("iapt", base, s, cfg) - budget), s))
        assert r == brute
        built = build_model(cfg, make_base("llama"))
        assert built.iapt_config.bottleneck == r and built.expected_parameter_count() == count_for("iapt", base, r, cfg)
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=5, num_soft_tokens=3))
    assert count_for("iapt", base, 5, TrainConfig(num_soft_tokens=3)) == model.expected_parameter_count()


def test_budget_sizes_on_smollm2_135m():
    """The default model's shape (d=576, 30 layers, 9 heads, 3 KV heads, head dim 64), on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    budget = 30 * (2 * 576 * 32 + 32 * 4 + 12 + 32 + 576)
    assert budget == count_for("iapt", base, 32) == 1_128_360
    expected = {
        "lora": (20, 1_152_000),
        "prompt-tuning": (1959, 1_128_384),
        "prefix": (98, 1_128_960),
        "idpg": (391, 1_128_775),
        "lpt": (391, 1_128_775),
    }
    for method, (size, count) in expected.items():
        assert size_for_budget(method, base, budget) == size, method
        assert count_for(method, base, size) == count, method


def test_prefix_starts_as_the_keys_and_values_of_real_tokens(family):
    """After the init, prefix tuning computes what the bare model computes after those tokens (a hard prompt)."""
    from iapt.baselines.peft_methods import init_prefix_from_tokens

    model = build("prefix", family).eval()
    prompt = torch.tensor([5, 17, 33, 8, 60, 71, 12, 40, 9, 25])  # 10 virtual tokens, the default
    init_prefix_from_tokens(model.peft_model, prompt)
    row = left_padded_batch()[2][0]
    with torch.no_grad():
        mine = model(input_ids=row.unsqueeze(0)).logits[0]
        theirs = make_base(family)(input_ids=torch.cat([prompt, row]).unsqueeze(0)).logits[0, len(prompt) :]
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_the_old_registry_names_still_answer():
    """iapt.baselines' 0.1.0 functions delegate to iapt.methods (scripts written against them keep working)."""
    from iapt import baselines

    base = make_base("llama")
    assert baselines.count_for("lora", base, 3) == count_for("lora", base, 3)
    assert baselines.size_for_budget("iapt", base, 5_000) == size_for_budget("iapt", base, 5_000)
    assert type(baselines.build_baseline(TrainConfig(method="lora"), make_base("llama"))).__name__ == "PeftBaseline"
