"""``Checkpointer``: a run's checkpoints in one directory: when to write, writing (rank 0), rotation, resume.

The files themselves (atomic writes, safe loading, ranking by progress) are :mod:`.checkpoint`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, find_resumable, load_checkpoint, restore_rng, rotate, save_checkpoint
from .state import TrainState

__all__ = ["MODEL_KEYS", "Checkpointer"]

log = logging.getLogger("xnorpp")

# the model arguments a checkpoint must share with the config that resumes or evaluates it
MODEL_KEYS = ("name", "binarization", "scale", "num_classes", "in_chans", "input_size", "stem", "estimator",
              "kwargs", "block", "centre_weights", "binarize")  # fmt: skip
# what model arguments without a key mean by it (older checkpoints; keys stored only when they apply)
_ABSENT: dict[str, Any] = {"kwargs": {}, "block": "preact", "centre_weights": None, "binarize": None}


class Checkpointer:
    """Writes ``last.pt`` (every epoch), ``best.pt`` and ``step_*.pt`` (every ``every_steps`` steps, the newest
    ``keep_last`` kept) to ``directory`` from the ``primary`` rank, and finds where to resume.

    ``save=False`` writes nothing. A failed write (a full disk) is logged and training goes on; the
    previous file stays intact.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save: bool = True,
        keep_last: int = 2,
        every_steps: int | None = None,
        primary: bool = True,
    ) -> None:
        self.directory, self.save, self.keep_last = Path(directory), bool(save), int(keep_last)
        self.every_steps, self.primary = (int(every_steps) if every_steps else None), primary

    @staticmethod
    def step_name(global_step: int) -> str:
        return f"step_{global_step:09d}.pt"

    def due(self, global_step: int) -> bool:
        """Whether a step checkpoint is due after ``global_step`` steps."""
        return self.save and self.every_steps is not None and global_step % self.every_steps == 0

    def write(self, name: str, snapshot: Callable[[], dict[str, Any]]) -> Path | None:
        """Write ``snapshot()`` as ``name`` (primary rank; a step checkpoint rotates the older ones)."""
        if not (self.save and self.primary):
            return None
        try:
            path = save_checkpoint(snapshot(), self.directory / name)
            if name.startswith("step_"):
                rotate(self.directory, self.keep_last)
            return path
        except CheckpointError as e:
            log.error("%s", e)
            return None

    def find(
        self, ckpt_path: str | Path | None = None, search: bool = True
    ) -> tuple[Path, dict[str, Any]] | None:
        """``ckpt_path`` loaded if given, else (``search``) the checkpoint of ``directory`` furthest into
        training that loads, else ``None``."""
        if ckpt_path:
            return Path(ckpt_path), load_checkpoint(ckpt_path)
        return find_resumable(self.directory) if search else None

    @staticmethod
    def restore(
        ckpt: Mapping[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        *,
        primary: bool = True,
        start: float | None = None,
    ) -> TrainState:
        """Load a checkpoint's model, optimizer (and scaler) and random states; returns its train state
        for a start at ``start``."""
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        return TrainState.from_checkpoint(dict(ckpt), primary=primary, start=start)

    @staticmethod
    def check_model(
        ckpt: Mapping[str, Any], model_args: Mapping[str, Any], path: Path, keys: Sequence[str] = MODEL_KEYS
    ) -> None:
        """Refuse a checkpoint of another model: a :class:`CheckpointError` names every difference."""
        stored = ckpt.get("model_args")
        if stored is None:
            raise CheckpointError(f"checkpoint {path} has no model_args: not written by xnorpp's trainer")
        diff = {
            k: (stored.get(k, _ABSENT.get(k)), model_args.get(k, _ABSENT.get(k)))
            for k in keys
            if stored.get(k, _ABSENT.get(k)) != model_args.get(k, _ABSENT.get(k))
        }
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"checkpoint {path} is for a different model ({desc}); pick the matching config"
            )
