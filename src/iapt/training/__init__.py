"""Training and evaluation: the loop (accelerate), bi-level activation learning, checkpoints, plots."""

from iapt.training.config import ACTIVATION_MODES, TrainConfig
from iapt.training.evaluate import evaluate_task, generate_answers
from iapt.training.trainer import Trainer, train

__all__ = ["ACTIVATION_MODES", "TrainConfig", "Trainer", "evaluate_task", "generate_answers", "train"]
