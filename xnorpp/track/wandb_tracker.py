"""wandb tracking that never stops training: rank 0 only, offline by default, always finished.

Modes: ``offline`` (default: writes a run directory for a later ``wandb sync``), ``online`` (needs a key;
falls back to offline if the server cannot be reached), ``disabled`` (writes nothing).

The dashboard's layout (:meth:`WandbTracker.define_metrics`): every ``train/*`` key is plotted against
``global_step`` (logged in every training row), every ``val/*`` and ``train_epoch/*`` key against
``epoch``; ``val/top1``'s summary is its maximum, and ``best/val/top1`` (top-5, epoch) is the run's
headline. Rows carry their own x-axis keys and wandb counts rows itself, so rows re-logged after a
resume land where they belong.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["HISTOGRAM_BINS", "MODES", "WandbTracker", "histogram_counts"]

MODES: tuple[str, ...] = ("offline", "online", "disabled")
HISTOGRAM_BINS = 64
# x-axis of each family of keys (wandb's define_metric step metrics)
STEP_METRICS: dict[str, str] = {
    "train/*": "global_step",
    "health/*": "global_step",
    "health_layer/*": "global_step",
    "hist/*": "global_step",
    "train_epoch/*": "epoch",
    "val/*": "epoch",
}
SUMMARIES: dict[str, str] = {"val/top1": "max", "val/top5": "max", "val/loss": "min"}


def histogram_counts(values: Any, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray, int]:
    """``(counts, edges, dropped)`` of the finite values (``dropped``: how many NaN/Inf were left out).

    Constant values, or a range too narrow for ``bins`` distinct float64 edges, get one bin-wide range
    around their centre (``np.histogram`` refuses such a range: "Too many bins for data range"). Raises
    ``ValueError`` when nothing finite is left (an empty tensor, all NaN/Inf).
    """
    x = torch.as_tensor(values).detach().flatten().to("cpu", torch.float64).numpy()
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise ValueError("no finite values" if x.size else "empty tensor")
    lo, hi = float(finite.min()), float(finite.max())
    scale = max(abs(lo), abs(hi), 1.0)
    if hi - lo <= scale * 1e-9:  # constant, to within float64 resolution over `bins` bins
        centre, half = (lo + hi) / 2, scale * 1e-6
        lo, hi = centre - half, centre + half
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return counts, edges, int(x.size - finite.size)


class WandbTracker:
    """A thin wrapper around one wandb run; every call is a no-op when tracking is off.

    ``enabled`` is False on non-zero ranks and for ``mode="disabled"``. A failure to start (no network,
    bad key) in online mode retries offline; a failure offline turns tracking off. Either way training
    continues and the reason is logged. A value wandb cannot take is dropped with one warning per key.

    As a context manager it is always finished: on leaving the block it copies ``files`` (those that exist
    then, relative to ``dir``) into the run's files and finishes the run, with exit code 1 on an error.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        mode: str = "offline",
        project: str = "xnorpp",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
        notes: str | None = None,
        dir: str | Path = ".",
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        init_timeout: float = 60.0,
        files: Iterable[str | Path] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown logger.wandb.mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.run: Any = None
        self.dir, self.files = Path(dir), [Path(f) for f in files]
        self.mode = mode
        self.status = "disabled"
        self._warned: set[str] = set()
        if not enabled or mode == "disabled":
            return
        kwargs = dict(
            project=project, entity=entity, group=group, name=name, tags=tags, job_type=job_type, notes=notes,
            dir=str(dir), config=config, id=run_id, resume="allow" if run_id else None, reinit="finish_previous",
        )  # fmt: skip
        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = self._start(kwargs, mode, init_timeout)
        if self.run is None and mode == "online":
            log.warning("wandb could not start online; continuing with an offline run (sync it later)")
            self.run = self._start(kwargs, "offline", init_timeout)
            self.mode = "offline"
        if self.run is None:
            log.warning("wandb could not start; training continues without wandb")
            self.status = "failed"
        else:
            self.status = self.mode

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.save_files(self.files, self.dir)
        self.finish(0 if exc_type is None else 1)

    @staticmethod
    def _start(kwargs: dict[str, Any], mode: str, timeout: float) -> Any:
        try:
            import wandb

            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
                log.warning(
                    "logger.wandb.mode=online but no wandb API key (run `wandb login` or set WANDB_API_KEY)"
                )
                return None
            settings = wandb.Settings(init_timeout=timeout, silent=True, console="off")
            return wandb.init(mode=mode, settings=settings, **kwargs)
        except Exception as e:  # wandb raises many types (CommError, UsageError, timeouts)
            hint = (
                " (the interrupted process's run is still open in a wandb service this process shares through "
                "WANDB_SERVICE; that service closes it within minutes)" if "in use" in str(e) else ""
            )  # fmt: skip
            log.warning("wandb.init failed (%s: %s)%s", type(e).__name__, e, hint)
            return None

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    @property
    def run_dir(self) -> str | None:
        return None if self.run is None else str(Path(self.run.dir).parent)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("wandb: %s (warned once for %s; training continues)", message, key)

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._warn_once(what, f"{what} failed ({type(e).__name__}: {e})")

    def log(self, metrics: dict[str, Any]) -> None:
        """Log one row. ``None`` values are left out; if wandb refuses the row, the values that are not
        plain numbers are dropped (one warning per key) and the numbers logged."""
        if self.run is None:
            return
        row = {k: v for k, v in metrics.items() if v is not None}
        try:
            self.run.log(row)
            return
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for key in sorted(set(row) - set(numbers)):
            self._warn_once(key, f"cannot log {key} ({error}); dropped")
        if numbers:
            self._safe("log", self.run.log, numbers)

    def log_history(self, rows: Iterable[dict[str, Any]]) -> None:
        """Log per-epoch rows again (after a resume: what a killed process logged may never have
        reached the run's file); their ``epoch`` keys put them at their place on the epoch axis."""
        for row in rows:
            self.log(epoch_row_for_wandb(row))

    def histogram(self, key: str, values: Any) -> Any:
        """A ``wandb.Histogram`` of ``values`` (finite ones), or ``None`` (one warning per key) when there
        is nothing to show or wandb refuses it."""
        if self.run is None:
            return None
        try:
            import wandb

            counts, edges, dropped = histogram_counts(values)
            if dropped:
                self._warn_once(
                    f"{key}:nonfinite", f"{key} has {dropped} NaN/Inf values, left out of its histogram"
                )
            return wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
        except Exception as e:
            self._warn_once(key, f"cannot make a histogram of {key} ({type(e).__name__}: {e}); dropped")
            return None

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Log a list of same-keyed dicts as a wandb Table."""
        if not rows:
            return

        def _do() -> None:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

        self._safe(key, _do)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (the runs table's columns)."""
        self._safe("summary", lambda: self.run.summary.update(values))

    def define_metrics(self) -> None:
        """One x-axis per family of keys (:data:`STEP_METRICS`) and ``val/top1``'s summary as its max."""

        def _do() -> None:
            self.run.define_metric("global_step")
            self.run.define_metric("epoch")
            for pattern, step in STEP_METRICS.items():
                self.run.define_metric(pattern, step_metric=step)
            for key, how in SUMMARIES.items():  # a named key overrides its family: repeat the step metric
                self.run.define_metric(key, step_metric="epoch", summary=how)

        self._safe("define_metric", _do)

    def save_files(self, paths: Iterable[Path], base: Path) -> None:
        """Copy files (config, results, console log) into the run's files, kept with it on sync."""
        if self.run is None:
            return
        files = Path(self.run.dir)
        for path in paths:
            if not path.is_file():
                continue

            def _do(path: Path = path) -> None:
                target = files / path.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                self.run.save(str(target), base_path=str(files), policy="now")

            self._safe(f"save {path.name}", _do)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Finish the run (later calls do nothing); ``preempted``: mark it preempting first."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            if preempted:
                run.mark_preempting()
            run.finish(exit_code=exit_code)
        except Exception as e:
            log.warning("wandb finish failed (%s: %s)", type(e).__name__, e)


def epoch_row_for_wandb(row: dict[str, Any]) -> dict[str, Any]:
    """A per-epoch history row with its train metrics under ``train_epoch/`` (``train/`` holds per-step
    values: one key, one kind of value, one x-axis)."""
    return {("train_epoch/" + k[len("train/") :] if k.startswith("train/") else k): v for k, v in row.items()}


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
