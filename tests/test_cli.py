"""The `iapt` command end to end on a tiny local model and synthetic task files (no download)."""

from __future__ import annotations

import json

import pytest

from iapt.cli import main
from iapt.data import tasks
from tests.data.conftest import synthetic_task_files, write_json
from tests.tiny import tiny_lm, tiny_tokenizer


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "cache"))
    root = tasks.cache_dir() / f"bigbench-{tasks.BIGBENCH_VERSION}"
    for rel, data in synthetic_task_files().items():
        if rel.startswith("multiemo"):
            write_json(root / rel, data)
    tasks._splits.cache_clear()
    model_dir = tmp_path / "model"
    tiny_lm().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return tmp_path, model_dir


def test_data_list_shows_what_is_fetched(setup, capsys):
    assert main(["data", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "not fetched" not in lines["sentiment"] and "not fetched" in lines["squad"]


def test_train_then_eval_an_adapter_and_the_base(setup, capsys):
    tmp_path, model_dir = setup
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--task",
            "sentiment",
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--bottleneck",
            "4",
            "--max-length",
            "64",
            "--eval-every",
            "2",
            "--no-progress",
            "--activation-mode",
            "joint",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["activation_mode"] == "joint"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report_file = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(out),
                "--model",
                str(model_dir),
                "--task",
                "sentiment",
                "--limit",
                "6",
                "--no-progress",
                "--out",
                str(report_file),
            ]
        )
        == 0
    )
    report = json.loads(report_file.read_text())
    assert report["examples"] == 6 and 0.0 <= report["metrics"]["accuracy"] <= 100.0
    assert report["adapter"] == str(out)
    capsys.readouterr()
    assert (
        main(["eval", "--base-only", "--model", str(model_dir), "--task", "sentiment", "--limit", "4", "--no-progress"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["adapter"] is None


def test_recipe_and_flags(setup, capsys):
    tmp_path, model_dir = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model_dir}\ntask: sentiment\nmax_steps: 1\nbatch_size: 2\nbottleneck: 2\n"
        "max_length: 64\nprogress: false\neval_every: 1\n"
    )
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--bottleneck", "3"]) == 0
    saved = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert saved["bottleneck"] == 3 and saved["max_steps"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope", "--out", "x"], "unknown task 'nope'"),
        (["eval", "--task", "sentiment"], "--adapter"),
        (["eval", "--adapter", "missing-dir", "--task", "sentiment"], "no adapter at missing-dir"),
        (["train", "--model", "no/such/model", "--task", "sentiment", "--out", "x"], "no/such/model"),
    ],
)
def test_bad_input_is_one_clear_line(setup, capsys, argv, message, monkeypatch):
    tmp_path, model_dir = setup
    monkeypatch.chdir(tmp_path)
    if argv[0] == "eval" and "--model" not in argv:
        argv = argv + ["--model", str(model_dir)]
    if argv[0] == "train" and "--model" not in argv:
        argv = argv + ["--model", str(model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_training_arguments_names_are_accepted(setup, monkeypatch):
    """transformers' TrainingArguments names map to the same settings as the short flags."""
    from iapt import cli

    seen = {}
    monkeypatch.setattr("iapt.training.train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    tmp_path, model_dir = setup
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--task",
            "sentiment",
            "--output-dir",
            str(tmp_path / "r"),
            "--learning-rate",
            "3e-4",
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "3",
            "--num-train-epochs",
            "2",
            "--bf16",
            "--logging-steps",
            "5",
            "--max-grad-norm",
            "0.5",
            "--eval-steps",
            "7",
            "--save-steps",
            "14",
        ]
    )
    cfg = seen["cfg"]
    assert code == 0
    assert (cfg.out, cfg.lr, cfg.batch_size, cfg.epochs, cfg.dtype) == (str(tmp_path / "r"), 3e-4, 6, 2.0, "bfloat16")
    assert (cfg.logging_steps, cfg.max_grad_norm, cfg.eval_every, cfg.save_every) == (5, 0.5, 7, 14)
    assert main(["train", "--task", "sentiment", "--bf16", "--dtype", "float32"]) == 2  # contradiction: clear error
    assert cli.TRAINING_ARGUMENT_ALIASES["lr"] == ["--learning-rate"]


def test_eval_on_your_own_file_with_a_chosen_metric(setup, capsys):
    tmp_path, model_dir = setup
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"Is {w} a fruit?", "output": a}) + "\n"
            for w, a in [("apple", "yes"), ("stone", "no"), ("pear", "yes")]
        )
    )
    for metric in ("accuracy", "exact_match", "f1", "rougeL", "bleu"):
        assert (
            main(
                [
                    "eval",
                    "--base-only",
                    "--model",
                    str(model_dir),
                    "--data",
                    str(data),
                    "--metric",
                    metric,
                    "--max-new-tokens",
                    "4",
                    "--no-progress",
                ]
            )
            == 0
        )
        report = json.loads(capsys.readouterr().out)
        assert report["examples"] == 3 and 0.0 <= report["metrics"][metric] <= 100.0
        assert len(report["per_example"]) == (0 if metric == "bleu" else 3)
        if metric == "accuracy":
            assert report["majority_rate"] == pytest.approx(66.67) and report["gold_labels"] == {"yes": 2, "no": 1}
    assert main(["eval", "--base-only", "--model", str(model_dir), "--data", str(data)]) == 2
    assert "--metric" in capsys.readouterr().err


def test_score_answers_per_metric():
    from iapt.data import Example
    from iapt.training.evaluate import score_answers

    examples = [Example(prompt="q1", response="Paris"), Example(prompt="q2", response="the blue house")]
    assert score_answers("exact_match", ["paris.", "a red house"], examples) == (50.0, [100.0, 0.0])
    f1, each = score_answers("f1", ["paris", "blue house"], examples)
    assert each == [100.0, 100.0] and f1 == 100.0  # SQuAD normalisation drops articles and punctuation
    accuracy, _ = score_answers("accuracy", ["It is Paris.", "no idea"], examples, labels=["Paris", "the blue house"])
    assert accuracy == 50.0


# ---------------------------------------------------------------------------------------- serve
def test_serve_takes_vllms_flags(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("iapt.serving.app.serve", lambda **kw: seen.update(kw))
    assert (
        main(
            [
                "serve",
                "--model",
                "m",
                "--api-key",
                "sk-1",
                "--served-model-name",
                "gpt",
                "gpt-alias",
                "--lora-modules",
                "a=runs/a",
                '{"name": "b", "path": "runs/b", "base_model_name": "m"}',
            ]
        )
        == 0
    )
    assert seen["api_key"] == "sk-1" and seen["served_model_name"] == ["gpt", "gpt-alias"]
    assert seen["lora_modules"] == {"a": "runs/a", "b": "runs/b"}
    assert main(["serve"]) == 0
    assert (seen["api_key"], seen["served_model_name"], seen["lora_modules"]) == (None, None, {})
    assert main(["serve", "--lora-modules", "a=x", "a=y"]) == 2
    assert "given twice" in capsys.readouterr().err
    for bad in ("no-equals-sign", "=path", '{"name": "x"}'):
        with pytest.raises(SystemExit):
            main(["serve", "--lora-modules", bad])
        assert "--lora-modules" in capsys.readouterr().err


def test_serve_with_api_key_served_name_and_lora_modules(setup, tmp_path, monkeypatch):
    """`iapt serve` end to end on 127.0.0.1 (uvicorn.run replaced by a background server the test talks to)."""
    import httpx

    from iapt.serving.app import BackgroundServer
    from tests.serving.conftest import save_adapter

    _, model_dir = setup
    adapter = save_adapter(tiny_lm(), tmp_path / "runs" / "tenant-a", 1, bottleneck=4, num_soft_tokens=2)
    seen = {}

    def run(app, **kwargs):
        with BackgroundServer(app) as server:

            def get(path: str, key: str = "sk-1") -> httpx.Response:
                return httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"})

            seen["models"] = [m["id"] for m in get("/v1/models").json()["data"]]
            seen["statuses"] = [
                get("/v1/models/served").status_code,
                get("/v1/models/alias").status_code,
                get(f"/v1/models/{model_dir}").status_code,
                get("/v1/models", "sk-2").status_code,
            ]
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": "a", "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": "Bearer sk-1"},
            )
            seen["completion"] = r.status_code

    monkeypatch.setattr("uvicorn.run", run)
    assert (
        main(
            [
                "serve",
                "--model",
                str(model_dir),
                "--api-key",
                "sk-1",
                "--served-model-name",
                "served",
                "alias",
                "--lora-modules",
                f"a={adapter}",
            ]
        )
        == 0
    )
    assert seen == {"models": ["served", "a"], "statuses": [200, 200, 404, 401], "completion": 200}


def test_serve_refuses_a_lora_module_that_is_not_iapt(setup, tmp_path, capsys, monkeypatch):
    _, model_dir = setup
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    monkeypatch.setattr("iapt.models.load_model", lambda *a, **k: pytest.fail("checked before the model loads"))
    assert main(["serve", "--model", str(model_dir), "--lora-modules", f"mine={lora}"]) == 2
    err = capsys.readouterr().err
    assert f"--lora-modules mine={lora}" in err and "only IAPT adapters are served by the built-in engine" in err
    assert main(["serve", "--model", str(model_dir), "--lora-modules", f"gone={tmp_path / 'nowhere'}"]) == 2
    assert "no adapter at" in capsys.readouterr().err


def test_list_settings_take_several_values(setup, monkeypatch):
    seen = {}
    monkeypatch.setattr("iapt.training.train", lambda cfg: seen.setdefault("cfg", cfg) and {})
    tmp_path, model_dir = setup
    assert (
        main(
            [
                "train",
                "--model",
                str(model_dir),
                "--task",
                "sentiment",
                "--out",
                str(tmp_path / "r"),
                "--anchor",
                "tokens",
                "--anchor-token-ids",
                "5",
                "6",
                "7",
                "8",
                "--layers",
                "1",
            ]
        )
        == 0
    )
    assert seen["cfg"].anchor_token_ids == [5, 6, 7, 8]
    assert seen["cfg"].layers == [1]
