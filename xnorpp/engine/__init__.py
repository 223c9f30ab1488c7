"""Training engine: loops, optimizer groups and schedules, data loaders, checkpoints, DDP."""

from .loop import NonFiniteLossError, StepState, evaluate, topk_correct, train_one_epoch
from .optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler, param_groups

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "NonFiniteLossError",
    "StepState",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "param_groups",
    "topk_correct",
    "train_one_epoch",
]
