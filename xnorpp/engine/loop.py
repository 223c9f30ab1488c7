"""``train_one_epoch`` and ``evaluate``: top-1/top-5 in percent, per-iteration LR, AMP, non-finite checks."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..track import Progress
from .distributed import all_reduce_sum, ranks_with, world_size
from .health import BinarizationHealth
from .preemption import Preemption

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "StepState", "autocast", "evaluate", "topk_correct", "train_one_epoch"]

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


@dataclass
class StepState:
    """Where training is: epoch, global optimizer step and batches done in the current epoch."""

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    # running sums of the current epoch (so a mid-epoch resume reports the same epoch metrics): this
    # rank's while training; in a checkpoint, the totals over ranks (:meth:`summed_over_ranks`)
    loss_sum: Any = 0.0
    correct: Any = 0
    seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints."""
        return {
            "epoch": self.epoch, "global_step": self.global_step, "batch_in_epoch": self.batch_in_epoch,
            "skipped_steps": self.skipped_steps, "loss_sum": float(self.loss_sum), "correct": int(self.correct),
            "seen": self.seen,
        }  # fmt: skip

    def summed_over_ranks(self, device: torch.device) -> StepState:
        """A copy whose running sums are the totals over all ranks (a collective: every rank calls it)."""
        sums = [float(self.loss_sum), float(self.correct), float(self.seen)]
        loss_sum, correct, seen = all_reduce_sum(
            torch.tensor(sums, dtype=torch.float64, device=device)
        ).tolist()
        return replace(self, loss_sum=loss_sum, correct=int(correct), seen=int(seen))

    @classmethod
    def from_dict(cls, d: dict[str, Any], primary: bool = True) -> StepState:
        """From :meth:`to_dict`; the stored totals over ranks go to the ``primary`` rank only, so that the
        epoch's sum over ranks counts them once, whatever the number of ranks."""
        state = cls(**d)
        if not primary:
            state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        return state


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``16``, a null context for ``32``."""
    if str(precision) not in PRECISIONS:
        raise ValueError(f"unknown trainer.precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[str(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def topk_correct(
    logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (clipped to #classes)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: StepState,
    *,
    device: torch.device,
    epochs: int,
    precision: str = "32",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    grad_clip: float | None = None,
    on_nonfinite: str = "error",
    log_every: int = 50,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    after_step: Callable[[StepState], None] | None = None,
    preemption: Preemption | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    health: BinarizationHealth | None = None,
    histogram: Callable[[str, torch.Tensor], Any] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train for one epoch (or until ``max_steps`` batches are done, or a ``preemption`` signal).

    ``scheduler.step_update(global_step)`` runs before every optimizer step, so the LR is a function of
    the global step alone (exact on resume). Before each backward the ranks pool whether their loss is
    finite and which preemption signals they received (one all-reduce), so they all skip, raise or stop
    after the same step; ``after_step`` runs after every step. ``log_fn`` gets one row per step: ``global_step`` (after
    the step), the fractional ``epoch`` and ``train/lr``; every ``log_every`` steps also the batch's
    ``train/loss``, ``train/top1_batch`` and ``train/img_per_s`` (reading the loss waits for the device,
    so not every step); health rows when ``health`` is due. ``loss_fn(logits, target)`` is the training
    loss (cross-entropy if ``None``); a loss with ``takes_inputs = True`` is called as
    ``loss_fn(logits, target, images)`` (distillation: its teacher runs on the batch inside the step, so
    its time counts in img/s). Returns mean loss, top-1 (percent), images/s.
    """
    epoch = _Epoch(
        model, loader, optimizer, scheduler, state, device=device, epochs=epochs, precision=precision, scaler=scaler,
        channels_last=channels_last, grad_clip=grad_clip, on_nonfinite=on_nonfinite, log_every=log_every,
        log_fn=log_fn, preemption=preemption, progress=progress, max_steps=max_steps, health=health,
        histogram=histogram, loss_fn=loss_fn or F.cross_entropy,
    )  # fmt: skip
    return epoch.run(after_step)


class _Epoch:
    """One call of :func:`train_one_epoch`: its arguments, the epoch's counters, and one method per part
    of a step."""

    def __init__(self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                 state: StepState, **options: Any) -> None:  # fmt: skip
        self.model, self.loader, self.optimizer, self.scheduler, self.state = (
            model,
            loader,
            optimizer,
            scheduler,
            state,
        )
        self.o = options
        self.device: torch.device = options["device"]
        total = len(loader) + state.batch_in_epoch
        self.total = total if options["max_steps"] is None else min(total, options["max_steps"])
        self.bar = Progress(self.total, state.epoch, options["epochs"], every=options["log_every"],
                            enabled=options["progress"])  # fmt: skip
        self.seen_here = 0

    def run(self, after_step: Callable[[StepState], None] | None) -> dict[str, float]:
        state, max_steps = self.state, self.o["max_steps"]
        self.model.train()
        if state.batch_in_epoch == 0:
            state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        state.loss_sum = torch.as_tensor(state.loss_sum, device=self.device, dtype=torch.float64)
        state.correct = torch.as_tensor(state.correct, device=self.device, dtype=torch.int64)
        self.start = time.perf_counter()
        stop = False
        for images, target in self.loader:
            if stop or (max_steps is not None and state.batch_in_epoch >= max_steps):
                break
            stop, stepped = self.step(images, target)
            if stepped and after_step is not None:
                after_step(state)
        return self.totals(time.perf_counter() - self.start)

    def step(self, images: torch.Tensor, target: torch.Tensor) -> tuple[bool, bool]:
        """One training step; returns (stop after it, it was an optimizer step: not a skipped one)."""
        o, state = self.o, self.state
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        if o["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        self.scheduler.step_update(state.global_step)
        # a skipped step leaves the model as it was: BatchNorm's running statistics too
        buffers = [b.clone() for b in self.model.buffers()] if o["on_nonfinite"] == "skip" else []
        health = o["health"]
        measure = health is not None and o["log_fn"] is not None and health.due(state.global_step)
        if measure:
            health.capture = True
        with autocast(self.device, o["precision"]):
            logits = self.model(images)
            scores = logits.float()
            with_inputs = getattr(o["loss_fn"], "takes_inputs", False)
            loss = o["loss_fn"](scores, target, images) if with_inputs else o["loss_fn"](scores, target)
        stop, nonfinite_ranks = self.pool_decisions(loss)
        if nonfinite_ranks:
            if measure:  # no step, no measurement: the capture ends with this forward
                health.capture = False
            self.skip_or_raise(loss, nonfinite_ranks, buffers)
            return stop, False
        self.backward(loss)
        health_row: dict[str, Any] = {}
        if measure:
            health.capture = False
            health_row = health.measure(o["histogram"])
        self.record(loss, logits, target, health_row)
        return stop, True

    def pool_decisions(self, loss: torch.Tensor) -> tuple[bool, int]:
        """One all-reduce over ranks: on how many the loss is not finite, and whether to stop (a
        preemption signal reached any rank)."""
        preemption = self.o["preemption"]
        votes = preemption.votes() if preemption is not None else []
        nonfinite_ranks, *signalled = ranks_with([not bool(torch.isfinite(loss)), *votes], self.device)
        return preemption is not None and preemption.agree(signalled), nonfinite_ranks

    def skip_or_raise(self, loss: torch.Tensor, nonfinite_ranks: int, buffers: list[torch.Tensor]) -> None:
        """``on_nonfinite=skip``: count the step, restore the buffers; else stop with the step named."""
        state = self.state
        if self.o["on_nonfinite"] == "skip":
            state.skipped_steps += 1
            log.warning("non-finite loss at step %d (epoch %d); step skipped", state.global_step, state.epoch)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            state.batch_in_epoch += 1
            state.global_step += 1
            return
        world = world_size()
        where = "" if world == 1 else f" on {nonfinite_ranks} of {world} ranks (this rank's: {loss.item()})"
        raise NonFiniteLossError(
            f"loss is {'not finite' if world > 1 else loss.item()}{where} at global step {state.global_step} "
            f"(epoch {state.epoch}, batch {state.batch_in_epoch}); the last good checkpoint is kept. Lower "
            "optimizer.lr, check the data, or set trainer.on_nonfinite=skip to skip such steps"
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Backward (scaled for fp16), optional gradient clipping, optimizer step."""
        scaler, grad_clip, optimizer = self.o["scaler"], self.o["grad_clip"], self.optimizer
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            optimizer.step()

    def record(
        self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, health_row: dict[str, Any]
    ) -> None:
        """Add the step to the epoch's sums, advance the counters, show and log its row."""
        o, state = self.o, self.state
        n = target.shape[0]
        batch_correct = topk_correct(logits.detach(), target, (1,))[0]
        state.loss_sum += loss.detach().double() * n
        state.correct += batch_correct
        state.seen += n
        self.seen_here += n
        state.batch_in_epoch += 1
        state.global_step += 1
        at_log_step = state.batch_in_epoch % max(1, o["log_every"]) == 0 or state.batch_in_epoch == self.total
        lr = self.optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {
            "global_step": state.global_step, "epoch": state.epoch + state.batch_in_epoch / max(self.total, 1),
            "train/lr": lr,
        }  # fmt: skip
        if (o["progress"] or o["log_fn"] is not None) and at_log_step:
            ips = self.seen_here / max(time.perf_counter() - self.start, 1e-9)
            top1 = 100.0 * int(batch_correct) / n
            self.bar.update(state.batch_in_epoch, loss.item(), top1, lr, ips)
            row.update({"train/loss": loss.item(), "train/top1_batch": top1, "train/img_per_s": ips})
        if o["log_fn"] is not None:
            o["log_fn"]({**row, **health_row})

    def totals(self, elapsed: float) -> dict[str, float]:
        """The epoch's mean loss and top-1 (percent) over all ranks, and images per second (summed)."""
        state, device = self.state, self.device
        totals = all_reduce_sum(
            torch.stack([state.loss_sum.double(), state.correct.double(), torch.tensor(float(state.seen), device=device),
                         torch.tensor(float(self.seen_here) / max(elapsed, 1e-9), device=device)])
        )  # fmt: skip
        seen_all = max(totals[2].item(), 1.0)
        return {
            "train/loss": totals[0].item() / seen_all,
            "train/top1": 100.0 * totals[1].item() / seen_all,
            "train/img_per_s": totals[3].item(),  # summed over ranks
            "train/images": totals[2].item(),
            "train/time_s": elapsed,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    precision: str = "32",
    channels_last: bool = False,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the loader, summed exactly over all ranks."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, n
    for i, (images, target) in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = topk_correct(logits, target, (1, 5))
        sums += torch.stack(
            [
                loss.double(),
                c1.double(),
                c5.double(),
                torch.tensor(float(target.numel()), device=device, dtype=torch.float64),
            ]
        )
    sums = all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    loss = sums[0].item() / n
    return {
        "val/loss": loss if math.isfinite(loss) else float("nan"),
        "val/top1": 100.0 * sums[1].item() / n,
        "val/top5": 100.0 * sums[2].item() / n,
        "val/images": sums[3].item(),
    }
