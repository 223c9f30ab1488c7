"""Training engine: loops, optimizer groups and schedules, data loaders, checkpoints, DDP."""

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

__all__ = [
    "LR_SCALES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "NonFiniteLossError",
    "StepState",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "lr_factor",
    "param_groups",
    "topk_correct",
    "train_one_epoch",
]
