"""Training engine: the Trainer over a TrainState, checkpoints, loops, optimizers and schedules, loaders, DDP."""

from .checkpointer import MODEL_KEYS, Checkpointer
from .loop import NonFiniteLossError, StepState, evaluate, topk_correct, train_one_epoch
from .optim import (
    LR_SCALES,
    OPTIMIZERS,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
)
from .state import TrainState
from .trainer import Callback, Trainer, TrainerOptions

__all__ = [
    "LR_SCALES",
    "MODEL_KEYS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "Callback",
    "Checkpointer",
    "NonFiniteLossError",
    "StepState",
    "TrainState",
    "Trainer",
    "TrainerOptions",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "lr_factor",
    "param_groups",
    "topk_correct",
    "train_one_epoch",
]
