"""IAPT as a PEFT method: get_peft_model, PeftModel save/load, and folders shared with IAPTModel."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, PeftModelForCausalLM, get_peft_model

from iapt import IAPTConfig, IAPTModel, get_iapt_model
from tests.tiny import left_padded_batch, make_base


def randomize(generators) -> None:
    with torch.no_grad():
        for g in generators.values():
            g.up.weight.normal_(std=0.1)


def test_get_peft_model_trains_and_matches_iaptmodel():
    torch.manual_seed(0)
    peft_model = get_peft_model(make_base("llama"), IAPTConfig(bottleneck=8))
    assert isinstance(peft_model, PeftModelForCausalLM)
    randomize(peft_model.base_model.generators)
    ours = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
    ours.generators.load_state_dict(peft_model.base_model.generators.state_dict())
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == ours.expected_parameter_count()
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ours(ids, attention_mask=mask, labels=labels).logits)
    out.loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(".generators." in n for n in grads), "gradients reach the generators only"
    peft_model.base_model.disable_adapter_layers()  # PEFT's tuner switch: the bare backbone
    bare = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.base_model.enable_adapter_layers()
    torch.testing.assert_close(bare, peft_model.get_base_model()(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(bare, out.logits)


def test_peft_and_iapt_folders_are_the_same_format(tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(make_base("llama"), IAPTConfig(bottleneck=8))
    randomize(peft_model.base_model.generators)
    ids, mask, _ = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = peft_model.generate(**kwargs)
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IAPT" and saved["task_type"] == "CAUSAL_LM" and saved["peft_version"]
    assert isinstance(PeftConfig.from_pretrained(str(tmp_path / "peft")), IAPTConfig)

    base = peft_model.base_model.unload()
    ours = IAPTModel.from_pretrained(base, tmp_path / "peft")  # a PEFT-written folder, read by IAPTModel
    with torch.no_grad():
        assert torch.equal(ours.generate(**kwargs), expected)
    ours.save_pretrained(tmp_path / "iapt")
    ours.unload()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "iapt"))  # an IAPTModel folder, read by PEFT
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference unless is_trainable"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(loaded.generate(**kwargs), expected)


def test_trainable_load_and_refusals(tmp_path):
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
    model.save_pretrained(tmp_path / "a")
    base = model.unload()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a"), is_trainable=True)
    assert loaded.get_nb_trainable_parameters()[0] == model.expected_parameter_count()
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()


def test_unknown_config_keys_from_a_newer_version_are_ignored_with_a_warning(tmp_path):
    model = get_iapt_model(make_base("llama"), IAPTConfig(bottleneck=8))
    model.save_pretrained(tmp_path / "a")
    base = model.unload()
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "feature_of_2027": 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = IAPTModel.from_pretrained(base, tmp_path / "a")
    assert any("feature_of_2027" in str(w.message) for w in caught)
    assert loaded.iapt_config.bottleneck == 8


def test_transformers_trainer_checkpoints_hold_the_adapter_only_and_resume(tmp_path):
    """transformers.Trainer on the PEFT model: checkpoints are adapter folders, and a resumed run continues with
    the same losses as the uninterrupted one."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tests.tiny import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    rows = []
    for word, answer in [("apple", " yes"), ("zebra", " nah"), ("melon", " yes"), ("wagon", " nah")] * 4:
        prompt = tok(f"first letter early? {word}", add_special_tokens=False).input_ids
        reply = tok(answer, add_special_tokens=False).input_ids
        rows.append(
            {
                "input_ids": prompt + reply,
                "attention_mask": [1] * (len(prompt) + len(reply)),
                "labels": [-100] * len(prompt) + reply,
            }
        )  # -100 on the instruction: what IAPT pools

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.seen.append(float(logs["loss"]))

    def trainer(model, losses):
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=4,
            save_steps=2,
            logging_steps=1,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            seed=3,
            data_seed=3,
        )
        return Trainer(model=model, args=args, train_dataset=rows, callbacks=[losses])

    torch.manual_seed(0)
    whole = Losses()
    trainer(get_peft_model(tiny_lm(), IAPTConfig(bottleneck=4)), whole).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists(), "no copy of the backbone in a checkpoint"
    torch.manual_seed(0)
    resumed = Losses()
    trainer(get_peft_model(tiny_lm(), IAPTConfig(bottleneck=4)), resumed).train(resume_from_checkpoint=str(checkpoint))
    assert len(whole.seen) == 4 and resumed.seen == pytest.approx(whole.seen[2:], rel=1e-5)
    ours = IAPTModel.from_pretrained(tiny_lm(), checkpoint)  # a Trainer checkpoint is an IAPT adapter folder
    assert ours.iapt_config.bottleneck == 4


def test_the_recorded_base_is_loadable(tmp_path):
    """adapter_config.json's base_model_name_or_path names something load_model accepts (here: a local folder)."""
    from iapt.models import DEFAULT_ALIASES, DEFAULT_NAME, load_model
    from tests.tiny import tiny_lm, tiny_tokenizer

    tiny_lm().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    base, _ = load_model(tmp_path / "base")
    model = get_iapt_model(base, IAPTConfig(bottleneck=4))
    model.save_pretrained(tmp_path / "a")
    recorded = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"]
    again, _ = load_model(recorded)
    assert IAPTModel.from_pretrained(again, tmp_path / "a").iapt_config.bottleneck == 4
    assert DEFAULT_NAME in DEFAULT_ALIASES  # what the packaged default records is one of load_model's names
