"""Preemption: a signal stops training after a step every rank agrees on, then hands over to a requeue.

SIGTERM (a scheduler's preemption notice, a ``kill``), SIGUSR1 and SIGUSR2 (SLURM's ``--signal`` before
the time limit; submitit requeues on USR2) only set a flag. Once per step the ranks pool their flags
(:func:`~xnorpp.engine.distributed.ranks_with`), so a signal that reaches one rank stops every rank after
the same step. The trainer then writes the step checkpoint (rank 0), finishes the wandb run, runs the
handler ours replaced (submitit's requeues the job from rank 0) and every rank exits with
:data:`REQUEUE_EXIT_CODE`, or with what that handler exits with. A platform without some of these
signals (Windows has no SIGUSR1/SIGUSR2) goes on with those it has and says so once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REQUEUE_EXIT_CODE", "SIGNALS", "Attempts", "Preempted", "Preemption"]

log = logging.getLogger("xnorpp")

REQUEUE_EXIT_CODE = 124  # what a preempted run exits with: the signal for a launcher to requeue it
# in the order of preference for the hand-over: submitit's requeue signal first
SIGNALS: tuple[str, ...] = ("SIGUSR2", "SIGUSR1", "SIGTERM")
_said_missing = False


class Preempted(SystemExit):
    """Raised on every rank after a preemption checkpoint; exits with :data:`REQUEUE_EXIT_CODE`."""


class Preemption:
    """Catches :data:`SIGNALS` while training (a context manager; the main thread only)."""

    def __init__(self) -> None:
        self.signals: list[signal.Signals] = [getattr(signal, n) for n in SIGNALS if hasattr(signal, n)]
        self.received: set[int] = set()
        self.agreed: signal.Signals | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        global _said_missing
        missing = [n for n in SIGNALS if not hasattr(signal, n)]
        if missing and not _said_missing:
            _said_missing = True
            log.info(
                "%s do not exist on this platform: a preemption is caught through %s only",
                "/".join(missing), "/".join(s.name for s in self.signals) or "no signal",
            )  # fmt: skip
        for sig in self.signals:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.add(signum)
        if self.agreed is None:
            log.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)

    def votes(self) -> list[bool]:
        """Which of :attr:`signals` this process received, to pool over ranks."""
        return [s in self.received for s in self.signals]

    def agree(self, counts: list[int]) -> bool:
        """Take the pooled :meth:`votes` (ranks that received each signal); True once any rank got one.

        The signal handed over is the first, in :data:`SIGNALS` order, whose replaced handler is a Python
        function (submitit's), else the first received.
        """
        if self.agreed is None:
            got = [s for s, n in zip(self.signals, counts) if n]
            if got:
                handled = [s for s in got if callable(self._old.get(s))]
                self.agreed = (handled or got)[0]
                if self.agreed not in self.received:
                    log.warning(
                        "another rank received %s: checkpointing after the current step", self.agreed.name
                    )
        return self.agreed is not None

    def hand_over(self) -> BaseException:
        """Run the handler ours replaced for the agreed signal (submitit's: requeue the job from rank 0)
        and return what to raise once every rank is done: its exit or error, else :class:`Preempted`."""
        old = self._old.get(self.agreed) if self.agreed is not None else None
        if callable(old):
            try:
                old(self.agreed, None)
            except BaseException as e:  # submitit's sys.exit after the requeue, or why it did not requeue
                return e
        return Preempted(REQUEUE_EXIT_CODE)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Attempts:
    """Wall time and starts of one training run over its requeues and resumes (stored in checkpoints).

    ``attempts`` counts the starts that ran (1 + resumes), ``requeues`` those that ended in a preemption
    checkpoint, ``wall_time_s`` their time up to their last checkpoint plus the time of this one.
    """

    wall_time_s: float = 0.0
    attempts: int = 1
    requeues: int = 0
    start: float = field(default_factory=time.time)

    @classmethod
    def resumed(cls, stored: dict[str, Any] | None, start: float) -> Attempts:
        """This start (at ``start``), continuing the run a checkpoint's :meth:`to_dict` describes (none: a
        checkpoint from before these were stored)."""
        if not stored:
            return cls(start=start)
        return cls(float(stored["wall_time_s"]), int(stored["attempts"]) + 1, int(stored["requeues"]), start)

    def to_dict(self, requeue: bool = False) -> dict[str, Any]:
        """Totals until now; ``requeue``: for the checkpoint this start ends with before a requeue."""
        return {
            "wall_time_s": self.wall_time_s + time.time() - self.start,
            "attempts": self.attempts,
            "requeues": self.requeues + int(requeue),
        }
