"""The `iapt` command: data, train, eval, demo, serve. Thin: it parses flags, then calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from iapt.data import DataError

# transformers' TrainingArguments names for the same settings, so `--learning-rate 3e-4 --output-dir runs/x` works.
TRAINING_ARGUMENT_ALIASES: dict[str, list[str]] = {
    "lr": ["--learning-rate"],
    "out": ["--output-dir"],
    "epochs": ["--num-train-epochs"],
    "eval_every": ["--eval-steps"],
    "save_every": ["--save-steps"],
    "max_train_examples": ["--max-train-samples"],
}


def _add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, aliases: dict[str, list[str]] | None = None
) -> None:
    """One --flag per dataclass field, with the field's help text: the command line is the config."""
    hints = typing.get_type_hints(cls)
    aliases = aliases or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *aliases.get(f.name, [])]
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if isinstance(kind, types.UnionType) else kind
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if base is bool:
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(base) is list:  # e.g. --anchor-token-ids 0 0 0 0
            parser.add_argument(
                *names,
                dest=f.name,
                nargs="+",
                type=typing.get_args(base)[0],
                default=None,
                help=help_text,
                metavar=f.name.upper(),
            )
        else:  # a field type (int, float, str, Path, ...) converts the flag's text
            parser.add_argument(
                *names,
                dest=f.name,
                type=cast(Callable[[str], Any], base),
                default=None,
                help=help_text,
                metavar=f.name.upper(),
            )


def _add_training_argument_flags(parser: argparse.ArgumentParser) -> None:
    """TrainingArguments flags that are not a plain rename of one of ours."""
    parser.add_argument(
        "--per-device-train-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="transformers' name: examples per micro-batch; batch size = N x gradient accumulation steps",
    )
    parser.add_argument(
        "--bf16",
        action="store_const",
        const="bfloat16",
        dest="bf16_dtype",
        default=None,
        help="transformers' name for --dtype bfloat16",
    )


def _training_argument_values(ns: argparse.Namespace, given: dict[str, Any]) -> dict[str, Any]:
    if getattr(ns, "bf16_dtype", None):
        if given.get("dtype") not in (None, "bfloat16", "bf16"):
            raise ValueError(f"--bf16 and --dtype {given['dtype']} contradict each other; pass one")
        given["dtype"] = "bfloat16"
    if getattr(ns, "per_device_train_batch_size", None):
        if "batch_size" in given:
            raise ValueError("pass --batch-size (per optimiser step) or --per-device-train-batch-size, not both")
        given["batch_size"] = ns.per_device_train_batch_size * given.get("gradient_accumulation_steps", 1)
    return given


def _given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}


# ---------------------------------------------------------------------------------------- data
def cmd_data(ns: argparse.Namespace) -> int:
    from iapt.data import TASKS, fetch_tasks

    if ns.action == "list":
        for name, task in sorted(TASKS.items()):
            state = "fetched" if task.is_fetched() else "not fetched (iapt data fetch)"
            print(f"{name:10s} {', '.join(task.metrics):18s} {state:32s} {task.description}")
        return 0
    paths = fetch_tasks(ns.tasks or None, progress=True)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


# ---------------------------------------------------------------------------------------- train
def cmd_train(ns: argparse.Namespace) -> int:
    from iapt.training import TrainConfig, train

    overrides = _training_argument_values(ns, _given(ns, TrainConfig))
    cfg = TrainConfig.from_yaml(ns.recipe, **overrides) if ns.recipe else TrainConfig.from_dict(overrides)
    summary = train(cfg)
    if cfg.eval_test and cfg.task:
        report = _evaluate(
            Path(cfg.out) / "adapter",
            cfg.model,
            cfg.task,
            "test",
            cfg.eval_limit,
            cfg.eval_batch_size,
            cfg.max_length,
            cfg.progress,
            cfg.dtype,
        )
        summary["test"] = report["metrics"]
        from iapt.io import atomic_write_text

        atomic_write_text(Path(cfg.out) / "eval_test.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------- eval
def _load_for_eval(adapter: str | Path | None, model_name: str, dtype: str = "float32") -> tuple[Any, Any]:
    from iapt.models import load_model

    base, tokenizer = load_model(model_name, dtype=dtype)
    if adapter is None:
        return base, tokenizer
    from iapt.adapters import load_adapter

    return load_adapter(base, adapter), tokenizer


def _evaluate(adapter, model_name, task, split, limit, batch_size, max_length, progress, dtype="float32") -> dict:
    from iapt.training import evaluate_task

    model, tokenizer = _load_for_eval(adapter, model_name, dtype)
    report = evaluate_task(model, tokenizer, task, split, limit, batch_size, max_length, progress)
    report["adapter"] = None if adapter is None else str(adapter)
    report["model"] = model_name
    return report


def cmd_eval(ns: argparse.Namespace) -> int:
    if (ns.adapter is None) == (not ns.base_only):
        raise ValueError("pass --adapter RUN_OR_ADAPTER_FOLDER, or --base-only for the zero-shot backbone")
    if (ns.task is None) == (ns.data is None):
        raise ValueError("pass --task (a built-in task) or --data FILE --metric M (your own test file)")
    if ns.data is not None:
        from iapt.training.evaluate import evaluate_file

        if ns.metric is None:
            raise ValueError("--data needs --metric: exact_match, accuracy, f1, rougeL or bleu")
        model, tokenizer = _load_for_eval(ns.adapter, ns.model, ns.dtype)
        report = evaluate_file(
            model,
            tokenizer,
            ns.data,
            ns.metric,
            ns.limit,
            ns.batch_size,
            ns.max_length,
            ns.max_new_tokens,
            ns.labels,
            not ns.no_progress,
        )
        report.update(adapter=None if ns.adapter is None else str(ns.adapter), model=ns.model)
    else:
        report = _evaluate(
            ns.adapter,
            ns.model,
            ns.task,
            ns.split,
            ns.limit,
            ns.batch_size,
            ns.max_length,
            not ns.no_progress,
            ns.dtype,
        )
    text = json.dumps(report, indent=2)
    if ns.out:
        from iapt.io import atomic_write_text

        atomic_write_text(ns.out, text + "\n")
    print(text)
    return 0


# ---------------------------------------------------------------------------------------- demo
def cmd_demo(ns: argparse.Namespace) -> int:
    """Fetch sentiment, score the zero-shot backbone, train IAPT for a few minutes, score again: each score beside
    the majority-class rate and the spread of predicted labels, so a constant answer cannot pass for learning."""
    import torch

    from iapt.data import fetch_tasks, get_task
    from iapt.models import fast_dtype, load_model
    from iapt.training import TrainConfig, evaluate_task
    from iapt.training.trainer import Trainer

    torch.set_num_threads(max(1, ns.threads))
    started = time.perf_counter()
    if not get_task(ns.task).is_fetched():
        fetch_tasks([ns.task])
    dtype = ns.dtype or fast_dtype()
    base, tokenizer = load_model(ns.model, dtype=dtype)
    print(f"[demo] zero-shot {ns.model} ({dtype}) on {ns.task} (test, first {ns.test_examples}) ...", flush=True)
    before = evaluate_task(base, tokenizer, ns.task, "test", ns.test_examples, 16, ns.max_length)
    cfg = TrainConfig(
        model=ns.model,
        task=ns.task,
        out=ns.out,
        max_steps=ns.steps,
        batch_size=ns.batch_size,
        lr=ns.lr,
        max_length=ns.max_length,
        eval_every=ns.steps,
        max_dev_examples=ns.dev_examples,
        warmup_ratio=0.1,
        bottleneck=ns.bottleneck,
        rational_every=ns.rational_every,
        dtype=dtype,
        resume=False,
    )
    if (Path(ns.out) / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(ns.out)  # the demo's own scratch folder: every demo is a fresh run
    print(f"[demo] training IAPT for {ns.steps} steps of {ns.batch_size} examples ...", flush=True)
    trainer = Trainer(cfg, base, tokenizer)
    summary = trainer.run()
    from iapt.model import IAPTModel

    model = cast(IAPTModel, trainer.unwrapped)  # the demo trains TrainConfig's default method, IAPT
    best = IAPTModel.from_pretrained(model.unload(), Path(ns.out) / "adapter")
    after = evaluate_task(best, tokenizer, ns.task, "test", ns.test_examples, 16, ns.max_length)
    total = time.perf_counter() - started
    metric = next(iter(before["metrics"]))
    trivial = max(before["metrics"][metric], before.get("majority_rate", 0.0))
    spread = lambda report: ", ".join(f"{k} {v}" for k, v in report.get("predicted_labels", {}).items())  # noqa: E731
    rows = [
        ("model", f"{ns.model} (frozen backbone, {dtype})"),
        ("task / test examples", f"{ns.task} / {before['examples']}"),
    ]
    if "majority_rate" in before:
        gold = ", ".join(f"{k} {v}" for k, v in before["gold_labels"].items())
        rows.append((f"{metric}: majority class", f"{before['majority_rate']:.1f} (test labels: {gold})"))
    rows += [
        (
            f"{metric}: zero-shot backbone",
            f"{before['metrics'][metric]:.1f}"
            + (f" (answers: {spread(before)})" if "predicted_labels" in before else ""),
        ),
        (
            f"{metric}: IAPT ({summary['steps']} steps)",
            f"{after['metrics'][metric]:.1f}" + (f" (answers: {spread(after)})" if "predicted_labels" in after else ""),
        ),
        ("gain over max(zero-shot, majority)", f"{after['metrics'][metric] - trivial:+.1f} points"),
        ("trainable parameters", f"{summary['trainable_params']:,d}"),
        ("training time", f"{summary['train_seconds']:.0f} s"),
        ("total time", f"{total:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "what".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print(f"\nadapter, metrics and plots: {ns.out}/")
    return 0


# ---------------------------------------------------------------------------------------- serve
def _lora_module(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` entry, as vLLM takes it: ``name=path`` or ``{"name": ..., "path": ...}``."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
            name, path = entry["name"], entry["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f'{text!r}: expected name=path or {{"name": ..., "path": ...}}') from None
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: expected name=path")
    if not isinstance(name, str) or not isinstance(path, str) or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: the name and the path must be non-empty")
    return name.strip(), path.strip()


def _vllm_serve() -> Any:
    """``iapt.vllm.engine.serve``, or a clear error where vLLM is not importable (it lives in its own venv)."""
    try:
        import vllm  # noqa: F401

        from iapt.vllm.engine import serve
    except ImportError as exc:
        raise ValueError(
            f"--engine vllm needs vLLM, which this Python cannot import ({exc}). Build its venv with "
            "`bash scripts/setup_vllm.sh`, then run `.venv-vllm/bin/iapt serve --engine vllm ...` (see docs/VLLM.md)"
        ) from None
    return serve


def cmd_serve(ns: argparse.Namespace) -> int:
    from iapt.serving.app import serve

    modules: dict[str, str] = {}
    for name, path in ns.lora_modules or []:
        if name in modules:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        modules[name] = path
    extra: dict[str, Any] = {}
    if ns.engine == "vllm":
        engine_kwargs = {"enforce_eager": True} if ns.enforce_eager else None
        serve, extra = _vllm_serve(), {"max_model_len": ns.max_model_len, "engine_kwargs": engine_kwargs}
    elif ns.max_model_len is not None or ns.enforce_eager:
        raise ValueError("--max-model-len and --enforce-eager are options of --engine vllm")
    serve(
        model=ns.model,
        adapters_dir=ns.adapters,
        host=ns.host,
        port=ns.port,
        keys_file=ns.keys,
        max_batch_size=ns.max_batch_size,
        max_queue=ns.max_queue,
        max_prompt_tokens=ns.max_prompt_tokens,
        max_tokens_limit=ns.max_tokens_limit,
        dtype=ns.dtype,
        log_level=ns.log_level,
        max_bottleneck=ns.max_bottleneck,
        max_soft_tokens=ns.max_soft_tokens,
        docs=not ns.no_docs,
        api_key=ns.api_key,
        served_model_name=ns.served_model_name,
        lora_modules=modules,
        **extra,
    )
    return 0


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from iapt.training import TrainConfig

    parser = argparse.ArgumentParser(prog="iapt", description="Instruction-Aware Prompt Tuning (arXiv 2405.18203)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="built-in tasks: list them, fetch them once")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("tasks", nargs="*", help="tasks to fetch (default: all)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "train",
        help="train an adapter (IAPT by default)",
        description="Every setting is a flag and may also come from a YAML --recipe; flags win. "
        "Runs on accelerate: `accelerate launch -m iapt.cli train ...` for several GPUs.",
    )
    p.add_argument("--recipe", help="YAML file of settings (flags override it)")
    _add_dataclass_flags(p, TrainConfig, TRAINING_ARGUMENT_ALIASES)
    _add_training_argument_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score an adapter (or the bare backbone) on a task by generation")
    p.add_argument("--adapter", help="run folder (holding adapter/) or adapter folder")
    p.add_argument("--base-only", action="store_true", help="score the zero-shot backbone")
    p.add_argument("--model", default="default", help="base model: 'default' or a local folder")
    p.add_argument("--task", help="built-in task (iapt data list)")
    p.add_argument(
        "--data",
        help="your own test file instead of --task (JSONL/JSON/CSV or a saved datasets folder, the training formats)",
    )
    p.add_argument(
        "--metric",
        choices=["exact_match", "accuracy", "f1", "rougeL", "bleu"],
        help="with --data: how answers are scored",
    )
    p.add_argument("--labels", nargs="+", help="with --metric accuracy: the label set (default: the responses seen)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --data: generated tokens per answer")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the main job: zero-shot vs IAPT on sentiment, on the CPU, in minutes")
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="sentiment")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bottleneck", type=int, default=45, help="IAPT r (45: the paper's r/d on SmolLM2-135M)")
    p.add_argument("--rational-every", type=int, default=5, help="bi-level Θ step every k optimiser steps")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--test-examples", type=int, default=100)
    p.add_argument("--dev-examples", type=int, default=32)
    p.add_argument("--dtype", default=None, help="backbone dtype (default: bfloat16 where the hardware has it)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one frozen backbone, many tenants' IAPT adapters")
    p.add_argument("--model", default="default", help="base model: 'default' or a local folder (its name in the API)")
    p.add_argument("--adapters", help="folder whose subfolders are IAPT adapters, each served under its folder name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", help="API keys file, JSON or YAML (key -> {tenant, adapters, admin}); none = open API")
    p.add_argument(
        "--api-key", metavar="KEY", help="as vLLM's: one key with access to everything (admin), beside any --keys file"
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="as vLLM's: the base model's name in the API instead of --model (several: all are "
        "accepted, the first is shown)",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=_lora_module,
        metavar="NAME=PATH",
        help="as vLLM's: IAPT adapter folders to serve under these names (beside --adapters); one that "
        "cannot be loaded stops the start",
    )
    p.add_argument(
        "--engine",
        choices=["builtin", "vllm"],
        default="builtin",
        help="builtin: the project's engine; vllm: vLLM's (its own venv: scripts/setup_vllm.sh; docs/VLLM.md)",
    )
    p.add_argument(
        "--max-model-len", type=int, help="with --engine vllm: context length (default: the model's); slots count"
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="with --engine vllm: no torch.compile (starts in seconds)"
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts get 400")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-bottleneck", type=int, default=512, help="largest adapter bottleneck r the server loads")
    p.add_argument("--max-soft-tokens", type=int, default=64, help="largest soft-token count n the server loads")
    p.add_argument("--no-docs", action="store_true", help="serve no /docs or /openapi.json")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as exc:
        print(f"iapt {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"iapt {ns.command}: interrupted (checkpoints are intact; `iapt train --resume` continues)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
