"""A user's own module, outside the package: what ``imports=[tests/user_ext.py]`` and ``_target_`` nodes load.

Registers an optimizer and a schedule under new names, and defines a loss and a callback for Hydra's
``_target_`` instantiation (``loss._target_=user_ext.HalvedCrossEntropy``, ``+callbacks.NAME._target_=...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.scheduler import StepLRScheduler

from xnorpp.engine import OPTIMIZERS, SCHEDULERS, Callback


@OPTIMIZERS.register("user_sgd", override=True)
def user_sgd(groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


@SCHEDULERS.register("user_halving", override=True)
def user_halving(optimizer: torch.optim.Optimizer, *, epochs: int, updates_per_epoch: int) -> Any:
    """LR halved after every step (per-update stepping, as the built-in schedules)."""
    return StepLRScheduler(optimizer, decay_t=1, decay_rate=0.5, t_in_epochs=False)


class HalvedCrossEntropy(torch.nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.cross_entropy(logits, target)


class EpochRecorder(Callback):
    """Writes what the trainer showed it to ``path`` (JSON) at the end of fitting."""

    def __init__(self, path: str) -> None:
        self.path, self.events = Path(path), []

    def on_fit_start(self, trainer: Any, state: Any) -> None:
        self.events.append(["start", state.epoch])

    def on_epoch_end(self, trainer: Any, state: Any, row: dict[str, float]) -> None:
        self.events.append(["epoch", row["epoch"], "val/top1" in row])

    def on_fit_end(self, trainer: Any, state: Any, results: dict[str, Any]) -> None:
        self.events.append(["end", results["global_step"]])
        self.path.write_text(json.dumps(self.events))
