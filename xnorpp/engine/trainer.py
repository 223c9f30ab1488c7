"""``Trainer``: fit (epochs of training, validation, checkpoints, preemption) and evaluate, over a ``TrainState``.

Every piece comes in built: model, optimizer, scheduler, loaders, a :class:`~.checkpointer.Checkpointer`
and a tracker; the options are plain values (:class:`TrainerOptions`), so a trainer runs without Hydra.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..track.wandb_tracker import WandbTracker, epoch_row_for_wandb
from .checkpoint import capture_rng
from .checkpointer import Checkpointer
from .distributed import barrier
from .health import BinarizationHealth
from .loop import StepState, evaluate, train_one_epoch
from .preemption import REQUEUE_EXIT_CODE, Preemption
from .state import TrainState

__all__ = ["Callback", "Trainer", "TrainerOptions"]

log = logging.getLogger("xnorpp")

LossFn = Callable[..., Tensor]  # loss(logits, target); loss(logits, target, images) with takes_inputs = True


@dataclass(frozen=True)
class TrainerOptions:
    """How to train (the ``trainer`` config group's training keys, as plain values)."""

    epochs: int = 1
    precision: str = "32"
    channels_last: bool = False
    grad_clip: float | None = None
    on_nonfinite: str = "error"
    log_every: int = 20
    health_every: int = 0
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    val_every: int = 1

    @classmethod
    def from_config(cls, trainer_cfg: Mapping[str, Any]) -> TrainerOptions:
        """The options a ``trainer`` config holds (other keys are ignored; missing ones take defaults)."""
        given = {f.name: trainer_cfg[f.name] for f in fields(cls) if f.name in trainer_cfg}
        for key in ("limit_train_batches", "limit_val_batches"):
            given[key] = int(given[key]) if given.get(key) else None
        return cls(**given)


class Callback:
    """Hooks into :meth:`Trainer.fit`; subclass and override what you need. Configured with Hydra's
    ``_target_`` under ``callbacks`` (``+callbacks.NAME._target_=my_module.MyCallback``)."""

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        """Before the first (or resumed) epoch."""

    def on_epoch_end(self, trainer: Trainer, state: TrainState, row: dict[str, float]) -> None:
        """After an epoch: ``row`` is its history row (train means, validation metrics if it validated)."""

    def on_fit_end(self, trainer: Trainer, state: TrainState, results: dict[str, Any]) -> None:
        """After the last epoch, with the results :meth:`Trainer.fit` returns."""


class Trainer:
    """Trains ``run_model`` (``model`` wrapped by DDP or ``torch.compile``, or ``model`` itself) and validates
    it; ``model`` is what checkpoints store. Only the primary rank writes checkpoints and logs."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_loader: DataLoader,
        val_loader: DataLoader,
        *,
        device: torch.device,
        options: TrainerOptions,
        checkpointer: Checkpointer,
        tracker: WandbTracker,
        run_model: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        primary: bool = True,
        loss_fn: LossFn | None = None,
        callbacks: Sequence[Callback] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.model, self.run_model = model, run_model if run_model is not None else model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.options, self.primary = device, options, primary
        self.checkpointer, self.tracker = checkpointer, tracker
        self.loss_fn, self.callbacks = loss_fn, list(callbacks)
        self.meta = dict(meta or {})  # stored in every checkpoint (model_args, config_yaml)

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        """Validation loss, top-1 and top-5 (percent) over the validation loader, summed over ranks."""
        o = self.options
        return evaluate(self.run_model, self.val_loader, device=self.device, precision=o.precision,
                        channels_last=o.channels_last, max_steps=o.limit_val_batches)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self, state: TrainState) -> dict[str, Any]:
        """Train from ``state`` to ``options.epochs``; returns the final and best metrics and counts."""
        health = self._health()
        for callback in self.callbacks:
            callback.on_fit_start(self, state)
        with Preemption() as preemption:
            while state.epoch < self.options.epochs:
                train_metrics = self._train_epoch(state, preemption, health)
                if preemption.agreed is not None:  # the same step on every rank
                    self._hand_over(state, preemption)
                self._end_epoch(state, train_metrics)
        results = self._results(state)
        for callback in self.callbacks:
            callback.on_fit_end(self, state, results)
        return results

    def _health(self) -> BinarizationHealth | None:
        every = int(self.options.health_every or 0)
        return BinarizationHealth(self.model, every) if every > 0 and self.tracker.enabled else None

    def _train_epoch(
        self, state: TrainState, preemption: Preemption, health: BinarizationHealth | None
    ) -> dict[str, float]:
        o, progress = self.options, state.progress
        self.train_loader.sampler.set_epoch(
            progress.epoch, progress.batch_in_epoch * int(self.train_loader.batch_size)
        )
        self.train_loader.dataset.set_epoch(progress.epoch)

        def after_step(s: StepState) -> None:
            if self.checkpointer.due(s.global_step):
                self.checkpoint(state, Checkpointer.step_name(s.global_step))

        return train_one_epoch(
            self.run_model, self.train_loader, self.optimizer, self.scheduler, progress, device=self.device,
            epochs=o.epochs, precision=o.precision, scaler=self.scaler, channels_last=o.channels_last,
            grad_clip=o.grad_clip, on_nonfinite=o.on_nonfinite, log_every=o.log_every,
            log_fn=self.tracker.log if self.tracker.enabled else None, after_step=after_step, preemption=preemption,
            progress=self.primary, max_steps=o.limit_train_batches, health=health, histogram=self.tracker.histogram,
            loss_fn=self.loss_fn,
        )  # fmt: skip

    def _hand_over(self, state: TrainState, preemption: Preemption) -> None:
        """Checkpoint the agreed step, finish the wandb run as preempting, hand over to the requeue
        (submitit's handler on rank 0) and stop every rank alike."""
        self.checkpoint(state, Checkpointer.step_name(state.global_step), requeue=True)
        self.tracker.log({"preempted": 1, "global_step": state.global_step})
        self.tracker.finish(REQUEUE_EXIT_CODE, preempted=True)  # before a requeue ends wandb's process
        exit_ = preemption.hand_over()
        barrier()  # no rank exits while rank 0 still writes or requeues
        raise exit_

    def _end_epoch(self, state: TrainState, train_metrics: dict[str, float]) -> None:
        """Close the epoch: validate when due, record and log its row, write ``last.pt`` (``best.pt``)."""
        o, progress = self.options, state.progress
        done = progress.epoch + 1
        progress.epoch, progress.batch_in_epoch = done, 0
        row: dict[str, float] = {"epoch": done, "global_step": progress.global_step, **train_metrics}
        improved = False
        if done % int(o.val_every) == 0 or done == o.epochs:
            metrics = self.evaluate()
            row.update(metrics)
            improved = state.improve(metrics, done)
            if self.primary:
                log.info("epoch %d/%d: val top-1 %.2f%% top-5 %.2f%% loss %.4f | train loss %.4f %.0f img/s",
                         done, o.epochs, metrics["val/top1"], metrics["val/top5"], metrics["val/loss"],
                         train_metrics["train/loss"], train_metrics["train/img_per_s"])  # fmt: skip
        state.history.append(row)
        self.tracker.log(epoch_row_for_wandb(row))
        self.checkpoint(state, "last.pt")
        if improved:
            self.checkpoint(state, "best.pt")
        for callback in self.callbacks:
            callback.on_epoch_end(self, state, row)

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self, state: TrainState, name: str, requeue: bool = False) -> None:
        """Write checkpoint ``name``. Every rank calls it: the epoch's running sums are totalled over ranks
        (a collective), then the primary rank writes."""
        if not self.checkpointer.save:
            return
        totals = state.progress.summed_over_ranks(self.device)
        self.checkpointer.write(name, lambda: self.snapshot(state, totals, requeue))

    def snapshot(
        self, state: TrainState, progress: StepState | None = None, requeue: bool = False
    ) -> dict[str, Any]:
        """What a checkpoint holds: model, optimizer (and scaler) states, the train state, the random
        states and :attr:`meta`."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **state.to_checkpoint(progress, requeue),
            "rng": capture_rng(),
            **self.meta,
        }

    # --------------------------------------------------------------------------------------------- results
    def _results(self, state: TrainState) -> dict[str, Any]:
        final = state.history[-1] if state.history else {}
        img_per_s = [h["train/img_per_s"] for h in state.history if "train/img_per_s" in h]
        return {
            **{
                k: final.get(k)
                for k in ("val/top1", "val/top5", "val/loss", "val/images", "train/loss", "train/top1")
            },
            "train/img_per_s": float(np.median(img_per_s)) if img_per_s else None,
            **state.best,
            "epochs": state.epoch,
            "global_step": state.global_step,
            "skipped_steps": state.progress.skipped_steps,
            "threads": torch.get_num_threads(),
            "history": state.history,
            "accuracy_unit": "percent",
        }
