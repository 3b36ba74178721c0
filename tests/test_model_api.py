"""Generation modes, decoding by hand, gradient checkpointing and the error paths (Llama-family tiny model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from tests.test_model import randomize_up_projections
from tests.tiny import VOCAB, left_padded_batch, make_base


@pytest.fixture
def model() -> IAPTModel:
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
    randomize_up_projections(model)
    return model


def test_beam_search_and_multiple_return_sequences(model):
    ids, mask, _ = left_padded_batch()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False
    )
    assert out.shape[0] == 2 * ids.shape[0]
    assert torch.equal(out[::2, : ids.shape[1]], ids)


def test_beam_search_row_matches_row_alone(model):
    ids, mask, rows = left_padded_batch(seed=2)
    batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    alone = model.generate(input_ids=rows[1].unsqueeze(0), max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(batch[1, -alone.shape[1] :], alone[0])


def test_sampling_is_reproducible_and_returns_dicts(model):
    ids, mask, _ = left_padded_batch()
    torch.manual_seed(0)
    a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=True,
        top_k=20,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert torch.equal(a, b.sequences)
    assert len(b.scores) == 6


def test_max_length_counts_real_tokens_only(model):
    ids, mask, _ = left_padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_manual_decoding_with_the_returned_cache_matches_generate(model):
    ids, mask, _ = left_padded_batch()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    cache = DynamicCache(config=model.config)
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    tokens, running_mask = ids, mask
    for _ in range(4):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        running_mask = torch.cat([running_mask, torch.ones_like(nxt)], 1)
        out = model(nxt, attention_mask=running_mask, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(tokens, expected)


def test_decode_step_with_a_wrong_mask_is_refused(model):
    ids, mask, _ = left_padded_batch()
    out = model(ids, attention_mask=mask, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    with pytest.raises(ValueError, match="mask of all tokens so far"):
        model(nxt, attention_mask=torch.ones_like(nxt), past_key_values=out.past_key_values)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
        torch.manual_seed(0)
        for g in model.generators.values():
            g.reset_parameters()
        randomize_up_projections(model)
        model.train()
        if checkpointing:
            model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        mlp_calls = []
        for layer in model.base_model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda *_, calls=mlp_calls: calls.append(1))
        model(ids, attention_mask=mask, labels=labels, instruction_mask=mask).loss.backward()
        assert len(mlp_calls) == (2 if checkpointing else 1) * 2, "checkpointing re-runs each layer in backward"
        grads.append([p.grad.clone() for p in model.generators.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_inputs_embeds_equal_input_ids(model):
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        by_ids = model(ids, attention_mask=mask).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    torch.testing.assert_close(by_ids, by_embeds, atol=1e-5, rtol=1e-5)


def test_bf16_backbone_keeps_float32_generators():
    model = get_iapt_model(make_base("llama").to(torch.bfloat16), IAPTConfig(bottleneck=8))
    assert all(p.dtype == torch.float32 for p in model.generators.parameters())
    ids, mask, _ = left_padded_batch()
    logits = model(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- bad input
def _saved(tmp_path, family: str = "llama"):
    model = get_iapt_model(make_base(family), IAPTConfig(bottleneck=8))
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "other, what",
    [
        ("gpt2", "architecture"),
        (dict(hidden_size=64), "hidden size"),
        (dict(num_hidden_layers=3), "layer count"),
    ],
)
def test_adapter_on_another_base_is_refused_naming_both_sides(tmp_path, other, what):
    path = _saved(tmp_path)
    if isinstance(other, str):
        base = make_base(other)
        have = "'gpt2'"
    else:
        cfg = dict(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
        cfg.update(other)
        base = LlamaForCausalLM(LlamaConfig(**cfg))
        have = str(next(iter(other.values())))
    with pytest.raises(ValueError, match=what) as err:
        IAPTModel.from_pretrained(base, path)
    message = str(err.value)
    assert have in message, message
    assert {"architecture": "'llama'", "hidden size": "48", "layer count": "2"}[what] in message


def test_missing_adapter_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IAPTModel.from_pretrained(make_base("llama"), tmp_path / "nope")
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        IAPTModel.from_pretrained(make_base("llama"), path)
    (path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        IAPTModel.from_pretrained(make_base("llama"), path)


def test_corrupt_adapter_files_are_named(tmp_path):
    path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*corrupt"):
        IAPTModel.from_pretrained(make_base("llama"), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json.*not valid JSON"):
        IAPTModel.from_pretrained(make_base("llama"), path)
    (path / "adapter_config.json").write_text(json.dumps({"bottleneck": 8, "colour": "red"}))
    # a key from a newer version is dropped with a warning naming it (PEFT's policy); the weights are still refused
    with pytest.warns(UserWarning, match="colour"), pytest.raises(ValueError, match="corrupt"):
        IAPTModel.from_pretrained(make_base("llama"), path)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["bottleneck"] = 16
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        IAPTModel.from_pretrained(make_base("llama"), path)


def test_unsupported_model_names_the_supported_families():
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(ValueError, match="model_type='opt'.*Supported decoder-only families: .*gpt2.*llama") as err:
        get_iapt_model(opt)
    assert "layers_path" in str(err.value)


def test_layers_path_opens_other_families():
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
        )
    )
    model = get_iapt_model(opt, IAPTConfig(bottleneck=4, layers_path="model.decoder.layers"))
    assert len(model.generators) == 2


@pytest.mark.parametrize("bad", [dict(num_soft_tokens=0), dict(activation_init="swish2"), dict(pooling="max")])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        IAPTConfig(**bad)


def test_bad_instruction_mask_shape_is_refused(model):
    ids, mask, _ = left_padded_batch()
    with pytest.raises(ValueError, match="instruction_mask has shape"):
        model(ids, attention_mask=mask, instruction_mask=mask[:, 1:])


def test_save_is_atomic_and_keeps_the_old_adapter_on_failure(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    model = get_iapt_model(make_base("llama", seed=1), IAPTConfig(bottleneck=8))

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("iapt.model.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_generators_on_some_layers_start_nonzero_and_train():
    """Slots flow on through generator-less layers; zero starts there would overflow the norms' gradients."""
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8, layers=[0], anchor="none"))
    assert list(model.generators) == ["0"]
    assert model.generators["0"].up.weight.abs().sum() > 0
    ids, mask, _ = left_padded_batch()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.generators.parameters())
    with pytest.raises(ValueError, match="layers 0..1"):
        get_iapt_model(make_base("llama"), IAPTConfig(layers=[2]))


def test_peft_style_model_api(tmp_path, monkeypatch):
    """num_parameters counts the generators, get_base_model / disable_adapter behave as in PEFT, push_to_hub
    uploads the adapter folder only, and saved files are readable by others (0644 under umask 022)."""
    torch.manual_seed(0)
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
    assert model.num_parameters(only_trainable=True) == model.expected_parameter_count()
    assert model.num_parameters() == model.expected_parameter_count() + model.base_model.num_parameters()
    assert model.get_base_model() is model.base_model
    randomize_up_projections(model)
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        with model.disable_adapter():
            bare = model(ids, attention_mask=mask).logits
            bare_gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        torch.testing.assert_close(bare, model.base_model(ids, attention_mask=mask).logits)
        assert not torch.allclose(bare, ours)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ours)  # back on after the block
        assert torch.equal(
            bare_gen,
            model.base_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
            ),
        )
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.push_to_hub("me/my-adapter")
    assert uploaded == {"repo": "me/my-adapter", "files": ["adapter_config.json", "adapter_model.safetensors"]}
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {"0o644"}


def test_text_generation_pipeline_takes_an_iapt_model(caplog):
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from tests.tiny import tiny_lm, tiny_tokenizer

    model = get_iapt_model(tiny_lm(), IAPTConfig(bottleneck=4))
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer())
    finally:
        hf_logging.disable_propagation()
    assert "not supported for text-generation" not in caplog.text
    out = generator("hello", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("hello")
