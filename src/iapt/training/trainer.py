"""The training loop, on accelerate: one process on a CPU, or `accelerate launch` on several GPUs.

A run folder holds everything: ``train_config.json``, ``adapter/`` (the best adapter by dev loss),
``checkpoint.pt`` (the latest state: adapter weights, optimisers, schedules, RNG, data position),
``metrics.jsonl``, ``summary.json`` and PNG plots. Every file is replaced atomically, so a kill at any
moment leaves the previous complete version; ``resume=True`` continues from the checkpoint and gives the
same result as a run that was never interrupted (same data order, optimiser and scheduler state).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from iapt import methods
from iapt.data import Collator, DataError, Encoded, encode_examples, get_task, load_examples
from iapt.io import atomic_write, atomic_write_text, replace_dir
from iapt.model import IAPTModel
from iapt.training.config import TrainConfig
from iapt.training.optim import Optimisers, build_optimisers

CHECKPOINT = "checkpoint.pt"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
# What iapt.io's atomic writes leave when killed: ".NAME.XXXXXXXX.tmp" (tempfile's 8 random characters), ".NAME.old"
_STALE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp|\..+\.old")

logger = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, drawn from (seed, epoch) alone: resumable and the same everywhere.

    Under ``accelerate launch`` each process takes every ``world``-th index of the same permutation.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world, self.epoch = size, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist()[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


@dataclass
class RunState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    dev_draws: int = 0  # dev batches drawn by the bi-level step
    best_dev_loss: float = math.inf
    best_step: int = 0
    evals_without_gain: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- data
def load_splits(cfg: TrainConfig) -> tuple[list, list]:
    """Training and dev examples from a built-in task or the user's files."""
    if (cfg.task is None) == (cfg.data is None):
        raise ValueError("pass exactly one of --task (a built-in task, see `iapt data list`) or --data (your file)")
    if cfg.task is not None:
        task = get_task(cfg.task)
        train, dev = task.load("train"), task.load("dev")
    else:
        assert cfg.data is not None, "exactly one of task and data (checked above)"
        train = load_examples(cfg.data)
        if cfg.dev_data is not None:
            dev = load_examples(cfg.dev_data)
        else:  # a seeded 10% of the file, at least one example, never all of it
            if len(train) < 2:
                raise DataError(
                    f"{cfg.data}: {len(train)} example(s) is too few to split off a dev set; pass --dev-data"
                )
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_dev = max(1, len(train) // 10)
            dev = [train[i] for i in sorted(order[:n_dev])]
            train = [train[i] for i in sorted(order[n_dev:])]
    if cfg.max_train_examples is not None:
        train = train[: cfg.max_train_examples]
    if cfg.max_dev_examples is not None:
        dev = dev[: cfg.max_dev_examples]
    return train, dev


def encode(tokenizer: Any, examples: list, cfg: TrainConfig, what: str) -> list[Encoded]:
    encoded, report = encode_examples(tokenizer, examples, cfg.max_length)
    if not encoded:
        source = cfg.task or (cfg.data if what == "training" else cfg.dev_data or cfg.data)
        if not examples:
            raise DataError(f"no {what} examples in {source}")
        raise DataError(
            f"no {what} example of {source} fits in max_length={cfg.max_length}: {report}. Raise --max-length."
        )
    if report.num_dropped:
        logger.warning("%s data: %s", what, report)
    return encoded


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, base: torch.nn.Module) -> torch.nn.Module:
    """The method of ``cfg`` installed on ``base``, from the method registry (IAPT like any other)."""
    return methods.build(cfg, base)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must keep: everything that is not the frozen backbone."""
    if hasattr(model, "generators"):
        generators = cast(torch.nn.Module, model.generators)
        return {k: v.detach().clone() for k, v in generators.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if hasattr(model, "generators"):
        cast(torch.nn.Module, model.generators).load_state_dict(state)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


# ---------------------------------------------------------------------------------------- loop
class Trainer:
    """Trains one model on one run folder; ``run()`` returns the summary."""

    def __init__(self, cfg: TrainConfig, base: torch.nn.Module | None = None, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.accelerator = Accelerator()
        self._check_run_folder()
        self._remove_stale_temporaries()
        train, dev = load_splits(cfg)  # before the model: a bad data file fails in a second, not after a download
        if base is None:
            from iapt.models import load_model

            base, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
        self.tokenizer = tokenizer
        self.train_data = encode(tokenizer, train, cfg, "training")
        self.dev_data = encode(tokenizer, dev, cfg, "dev")

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, base)
        self.micro_batch = cfg.batch_size // cfg.gradient_accumulation_steps
        self.collate = Collator.from_tokenizer(tokenizer, padding_side="right")
        self.sampler = EpochSampler(
            len(self.train_data), cfg.seed, self.accelerator.process_index, self.accelerator.num_processes
        )
        # Not handed to accelerate.prepare: its loader re-seeds epochs itself, which breaks exact resumption.
        # (a list is a map-style dataset; torch's annotation asks for a Dataset)
        self.loader: DataLoader[Encoded] = DataLoader(
            self.train_data,  # type: ignore[arg-type]
            batch_size=self.micro_batch,
            sampler=self.sampler,
            collate_fn=self.collate,
        )
        steps_per_epoch = max(1, len(self.loader) // cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.optim: Optimisers = build_optimisers(
            self.model,
            cfg.activation_mode,
            cfg.lr,
            cfg.rational_lr,
            cfg.weight_decay,
            self.total_steps,
            int(cfg.warmup_ratio * self.total_steps),
            cfg.rational_every,
        )
        self.model = self.accelerator.prepare(self.model)
        self.state = RunState()
        self.passes_instruction_mask = hasattr(self.unwrapped, "generators") or getattr(
            self.unwrapped, "accepts_instruction_mask", False
        )
        self._tensorboard = self._open_tensorboard()

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------ run folder
    def _check_run_folder(self) -> None:
        saved = self.out / CONFIG_FILE
        if self.cfg.resume:
            if not (self.out / CHECKPOINT).is_file():
                raise FileNotFoundError(
                    f"cannot resume: {self.out / CHECKPOINT} does not exist (start without --resume)"
                )
            previous = TrainConfig.from_dict(json.loads(saved.read_text()))
            diff = previous.differences(self.cfg)
            if diff:
                listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                raise ValueError(
                    f"cannot resume {self.out}: it was trained with other settings ({listed}). "
                    f"Use the same settings, or another --out for a new run."
                )
        elif (self.out / CHECKPOINT).exists():
            raise FileExistsError(
                f"{self.out} already holds a run: pass --resume to continue it, or choose another "
                f"--out (nothing was overwritten)"
            )

    def _remove_stale_temporaries(self) -> None:
        """Delete what a killed atomic write left in the run folder (``.NAME.XXXXXXXX.tmp`` files or folders,
        ``.NAME.old`` folders: the naming of :mod:`iapt.io`); nothing else is touched."""
        if not self.accelerator.is_main_process or not self.out.is_dir():
            return
        for path in self.out.iterdir():
            if _STALE.fullmatch(path.name):
                logger.info("removing %s, left by an interrupted write", path)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _open_tensorboard(self) -> Any:
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        payload = {
            "adapter": adapter_state(self.unwrapped),
            "optim": self.optim.state_dict(),
            "state": self.state.__dict__,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(payload, tmp))

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        try:
            payload = torch.load(path, weights_only=False, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(
                f"checkpoint {path} is unreadable ({exc}); the adapter in {self.out / 'adapter'} is "
                f"intact, start a new run to continue from scratch"
            ) from None
        load_adapter_state(self.unwrapped, payload["adapter"])
        self.optim.load_state_dict(payload["optim"])
        self.state = RunState(**payload["state"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        # metrics.jsonl may hold lines logged after this checkpoint: rewrite it from the checkpoint's history
        atomic_write_text(self.out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.state.history))

    def save_adapter(self) -> None:
        if self.accelerator.is_main_process:
            # every method's model has save_pretrained (IAPTModel, GeneratedPromptModel, PeftBaseline)
            replace_dir(cast(Callable[[Path], None], self.unwrapped.save_pretrained), self.out / "adapter")

    # ------------------------------------------------------------ steps
    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        keys = ["input_ids", "attention_mask", "labels"] + (
            ["instruction_mask"] if self.passes_instruction_mask else []
        )
        inputs: dict[str, Any] = {k: batch[k].to(device) for k in keys}
        if isinstance(self.unwrapped, IAPTModel):
            inputs["labelled_logits_only"] = True  # same loss, no vocabulary projection of unlabelled positions
        return inputs

    def _dev_batch(self) -> dict[str, torch.Tensor]:
        """The next dev batch for the Θ step: a seeded permutation per pass over the dev set."""
        n = len(self.dev_data)
        per_pass = max(1, math.ceil(n / self.micro_batch))
        pass_no, pos = divmod(self.state.dev_draws, per_pass)
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + 1 + pass_no)
        order = torch.randperm(n, generator=g).tolist()
        self.state.dev_draws += 1
        return self.collate([self.dev_data[i] for i in order[pos * self.micro_batch : (pos + 1) * self.micro_batch]])

    def _zero_grad(self) -> None:
        for p in self.unwrapped.parameters():
            p.grad = None

    def _optimiser_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> float:
        accum = len(micro_batches)
        total = 0.0
        for batch in micro_batches:
            loss = self.model(**self._inputs(batch)).loss / accum
            self.accelerator.backward(loss)
            total += loss.item()
        params = [p for g in self.optim.weights.param_groups for p in g["params"]]
        if self.cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optim.weights.step()
        self.optim.weights_schedule.step()
        self._zero_grad()
        if self.optim.rational is not None and self.state.step % self.cfg.rational_every == 0:
            # bi-level: Θ learns on held-out dev data (every k-th step: each costs a dev forward and backward)
            loss = self.model(**self._inputs(self._dev_batch())).loss
            self.accelerator.backward(loss)
            self.optim.rational.step()
            assert self.optim.rational_schedule is not None, "build_optimisers makes both or neither"
            self.optim.rational_schedule.step()
            self._zero_grad()
        return total

    @torch.no_grad()
    def dev_loss(self) -> float:
        """Token-level mean loss on the dev set (its exp is the dev perplexity)."""
        self.model.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(self.dev_data), self.micro_batch):
            batch = self.collate(self.dev_data[start : start + self.micro_batch])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += self.model(**self._inputs(batch)).loss.item() * n
            tokens += n
        self.model.train()
        return total / max(tokens, 1)

    def _log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if self._tensorboard is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self._tensorboard.add_scalar(k, v, record["step"])

    def _evaluate_and_maybe_stop(self) -> None:
        loss = self.dev_loss()
        self._log(
            {"step": self.state.step, "epoch": self.state.epoch, "dev_loss": loss, "dev_ppl": math.exp(min(loss, 50.0))}
        )
        if loss < self.state.best_dev_loss - 1e-6:
            self.state.best_dev_loss, self.state.best_step, self.state.evals_without_gain = loss, self.state.step, 0
            self.save_adapter()
        else:
            self.state.evals_without_gain += 1
            if self.state.evals_without_gain >= self.cfg.patience:
                self.state.stopped_early = True

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load_checkpoint()
        elif self.accelerator.is_main_process:
            atomic_write_text(self.out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
            atomic_write_text(self.out / METRICS_FILE, "")
        self.model.train()
        accum = cfg.gradient_accumulation_steps
        save_every = cfg.save_every or cfg.eval_every
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training", disable=not cfg.progress)
        started = time.perf_counter() - self.state.elapsed
        window_tokens, window_start = 0, time.perf_counter()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            self.sampler.set_epoch(self.state.epoch)
            batches = itertools.islice(iter(self.loader), self.state.micro_in_epoch, None)
            pending: list[dict[str, torch.Tensor]] = []
            for batch in batches:
                pending.append(batch)
                if len(pending) < accum:
                    continue
                loss = self._optimiser_step(pending)
                window_tokens += sum(int(b["attention_mask"].sum()) for b in pending)
                self.state.micro_in_epoch += accum
                self.state.step += 1
                pending = []
                lr = self.optim.weights_schedule.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                self.state.elapsed = time.perf_counter() - started
                if self.state.step % cfg.logging_steps == 0 or self.state.step == 1:
                    now = time.perf_counter()
                    self._log(
                        {
                            "step": self.state.step,
                            "epoch": self.state.epoch,
                            "train_loss": loss,
                            "lr": lr,
                            "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                            "elapsed_s": round(self.state.elapsed, 2),
                        }
                    )
                    window_tokens, window_start = 0, now
                last = self.state.step >= self.total_steps
                if self.state.step % cfg.eval_every == 0 or last:
                    self._evaluate_and_maybe_stop()
                if self.state.step % save_every == 0 or last or self.state.stopped_early:
                    self.save_checkpoint()
                if last or self.state.stopped_early:
                    break
            else:
                self.state.epoch += 1
                self.state.micro_in_epoch = 0
        bar.close()
        self.state.elapsed = time.perf_counter() - started
        return self.finish()

    def finish(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
        trainable += sum(
            p.numel() for p in getattr(self.unwrapped, "rational_parameters", list)() if not p.requires_grad
        )  # frozen Θ still belongs to the adapter
        summary = {
            "method": self.cfg.method,
            "activation_mode": self.cfg.activation_mode,
            "trainable_params": trainable,
            "steps": self.state.step,
            "best_step": self.state.best_step,
            "best_dev_loss": self.state.best_dev_loss,
            "best_dev_ppl": math.exp(min(self.state.best_dev_loss, 50.0)),
            "stopped_early": self.state.stopped_early,
            "train_seconds": round(self.state.elapsed, 2),
            "train_examples": len(self.train_data),
        }
        if self.accelerator.is_main_process:
            from iapt.training.plots import plot_run

            plot_run(self.out, self.state.history, self.unwrapped)
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.close()
        return summary


def train(cfg: TrainConfig, base: torch.nn.Module | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train per ``cfg`` (loading ``cfg.model`` unless a base model and tokenizer are given)."""
    return Trainer(cfg, base, tokenizer).run()
