"""Console progress: one line per ``every`` steps (and at the end) with loss, accuracy, lr and img/s."""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress"]

log = logging.getLogger("xnorpp")


class Progress:
    """Prints ``epoch 3/10 [ 120/352 34%] loss 0.412 top1 88.1 lr 0.0931 812 img/s eta 0:52``.

    On a terminal the line is redrawn in place; otherwise (logs, SLURM) a line is written every
    ``every`` steps so files stay short.
    """

    def __init__(self, total: int, epoch: int, epochs: int, every: int = 20, enabled: bool = True) -> None:
        self.total, self.epoch, self.epochs, self.every = total, epoch, epochs, max(1, every)
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, i: int, loss: float, top1: float, lr: float, img_per_s: float) -> None:
        if not self.enabled or not (i % self.every == 0 or i == self.total):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(i, 1) * (self.total - i)
        line = (
            f"epoch {self.epoch + 1}/{self.epochs} [{i:>{len(str(self.total))}}/{self.total} "
            f"{100 * i / max(self.total, 1):3.0f}%] loss {loss:.4f} top1 {top1:5.1f} lr {lr:.3g} "
            f"{img_per_s:6.0f} img/s eta {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if self.tty:
            end = "\n" if i == self.total else ""
            sys.stderr.write("\r" + line + end)
            sys.stderr.flush()
        else:
            log.info(line)
