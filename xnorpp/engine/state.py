"""``TrainState``: where a training run is, everything a checkpoint carries besides weights and optimizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .loop import StepState
from .preemption import Attempts

__all__ = ["NO_BEST", "TrainState"]

NO_BEST: dict[str, float] = {"best/val/top1": -1.0, "best/val/top5": -1.0, "best/epoch": -1}


@dataclass
class TrainState:
    """The position of a run (``progress``: epoch, global step, batch in the epoch, the epoch's running
    sums), its best validation result, the per-epoch history, the attempts (starts, requeues, wall time)
    and the id of its wandb run, so that a resumed run continues the same one."""

    progress: StepState = field(default_factory=StepState)
    best: dict[str, float] = field(default_factory=lambda: dict(NO_BEST))
    history: list[dict[str, float]] = field(default_factory=list)
    attempts: Attempts = field(default_factory=Attempts)
    wandb_id: str | None = None

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def global_step(self) -> int:
        return self.progress.global_step

    def improve(self, metrics: dict[str, float], epoch: int) -> bool:
        """Take a validation result of ``epoch``; True if its top-1 is a new best."""
        if not metrics["val/top1"] > self.best["best/val/top1"]:  # NaN is never a best
            return False
        self.best.update({"best/val/top1": metrics["val/top1"], "best/val/top5": metrics["val/top5"],
                          "best/epoch": epoch})  # fmt: skip
        return True

    def to_checkpoint(self, progress: StepState | None = None, requeue: bool = False) -> dict[str, Any]:
        """Plain values for a checkpoint; ``progress``: the position with its sums totalled over ranks
        (:meth:`StepState.summed_over_ranks`); ``requeue``: the checkpoint this start ends with."""
        return {
            "state": (progress or self.progress).to_dict(),
            "attempts": self.attempts.to_dict(requeue),
            "best": dict(self.best),
            "history": list(self.history),
            "wandb_id": self.wandb_id,
        }

    @classmethod
    def from_checkpoint(
        cls, ckpt: dict[str, Any], primary: bool = True, start: float | None = None
    ) -> TrainState:
        """The state a checkpoint stored, for a start at ``start`` (now if ``None``); the epoch's running
        sums go to the ``primary`` rank only (:meth:`StepState.from_dict`)."""
        return cls(
            progress=StepState.from_dict(ckpt["state"], primary=primary),
            best=dict(ckpt.get("best", NO_BEST)),
            history=list(ckpt.get("history", [])),
            attempts=Attempts.resumed(ckpt.get("attempts"), time.time() if start is None else start),
            wandb_id=ckpt.get("wandb_id"),
        )
