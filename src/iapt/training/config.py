"""TrainConfig: one training run, from flags or a YAML recipe. Defaults follow the paper."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iapt.options import MethodOptions

ACTIVATION_MODES = ("bilevel", "joint", "frozen")

# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_FIELDS = {"resume", "out", "progress", "eval_test", "eval_limit", "eval_batch_size"}


@dataclass
class TrainConfig(MethodOptions):
    """A training run of IAPT (or a baseline) on a task or an instruction file (the method's own options, from
    ``MethodOptions``, first)."""

    model: str = field(
        default="default",
        metadata={
            "help": "Base model: 'default' (packaged SmolLM2-135M-Instruct) or a local Hugging Face model folder."
        },
    )
    task: str | None = field(default=None, metadata={"help": "Built-in task (see `iapt data list`)."})
    data: str | None = field(
        default=None,
        metadata={"help": "Your own training file (JSONL/JSON/CSV or a saved datasets folder) instead of --task."},
    )
    dev_data: str | None = field(default=None, metadata={"help": "Dev file for --data; default: a seeded 10%% of it."})
    out: str = field(default="runs/iapt", metadata={"help": "Run folder: adapter, checkpoints, metrics, plots."})
    method: str = field(
        default="iapt",
        metadata={"help": "Method to train: iapt, or a baseline (lora, prompt-tuning, prefix, idpg, lpt)."},
    )
    budget: int | None = field(
        default=None,
        metadata={
            "help": "Target trainable-parameter count: each method picks its size (LoRA rank, prompt length, "
            "bottleneck) to come closest; the run records the exact count."
        },
    )
    activation_mode: str = field(
        default="bilevel",
        metadata={
            "help": "How the rational activations learn: bilevel (their coefficients on dev batches, the rest on train "
            "batches, alternating: first-order DARTS), joint (all on train batches), frozen (kept at init)."
        },
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of the generator weights."})
    rational_lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate of the rational coefficients."})
    rational_every: int = field(
        default=5,
        metadata={
            "help": "Bi-level: take the rational coefficients' dev step "
            "every k optimiser steps (each costs a forward and "
            "backward on a dev batch)."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (generator weights only)."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the generator weights' gradient norm to this (0 = no clipping)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N optimiser steps."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warm-up, as a fraction of all steps."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data (the paper: up to 10)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    batch_size: int = field(
        default=16, metadata={"help": "Examples per optimiser step (paper: 16, or 128 for >10k examples)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step; each holds batch_size / this many."}
    )
    max_length: int = field(default=512, metadata={"help": "Max tokens per example (prompt cut from the left)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_dev_examples: int | None = field(default=200, metadata={"help": "Dev examples for perplexity and bi-level."})
    eval_every: int = field(default=50, metadata={"help": "Dev perplexity every N optimiser steps (and at the end)."})
    patience: int = field(default=5, metadata={"help": "Early stopping: evaluations without a better dev loss."})
    save_every: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (default: each eval)."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation and data order."})
    dtype: str = field(default="float32", metadata={"help": "Backbone dtype: float32, bfloat16 or float16."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --out from its last checkpoint."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    eval_test: bool = field(default=False, metadata={"help": "After training, score generations on the test split."})
    eval_limit: int | None = field(default=None, metadata={"help": "Test examples to score (default: all)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of generation-based evaluation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_mode not in ACTIVATION_MODES:
            raise ValueError(f"activation_mode={self.activation_mode!r}; choose one of {list(ACTIVATION_MODES)}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}"
            )
        if self.logging_steps < 1 or self.max_grad_norm < 0:
            raise ValueError(
                f"logging_steps={self.logging_steps} must be >= 1 and max_grad_norm={self.max_grad_norm} >= 0"
            )
        if self.rational_every < 1:
            raise ValueError(f"rational_every={self.rational_every} must be >= 1 (1 = a Θ step after every step)")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too small to hold an instruction and a response")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A recipe file, with command-line values on top."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} must be a mapping of setting: value")
        try:
            return cls.from_dict({**data, **overrides})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"recipe {path}: {exc}") from None

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Settings that differ and would change the result (used to refuse a mismatched resume)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in RESUMABLE_FIELDS and mine[k] != theirs[k]}
