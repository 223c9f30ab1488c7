"""wandb tracking that never stops training: rank 0 only, offline by default, always finished.

Modes: ``offline`` (default: writes a run directory for a later ``wandb sync``), ``online`` (needs a key;
falls back to offline if the server cannot be reached), ``disabled`` (writes nothing).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MODES", "WandbTracker"]

MODES: tuple[str, ...] = ("offline", "online", "disabled")


class WandbTracker:
    """A thin wrapper around one wandb run; every call is a no-op when tracking is off.

    ``enabled`` is False on non-zero ranks and for ``mode="disabled"``. A failure to start (no network,
    bad key) in online mode retries offline; a failure offline turns tracking off. Either way training
    continues and the reason is logged.
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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown logger.wandb.mode {mode!r}; valid choices: {', '.join(MODES)}")
        self.run: Any = None
        self.mode = mode
        self.status = "disabled"
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
            log.warning("wandb.init failed (%s: %s)", type(e).__name__, e)
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

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            log.warning("wandb %s failed (%s: %s); training continues", what, type(e).__name__, e)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._safe("log", lambda: self.run.log(metrics, step=step))

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Log a list of same-keyed dicts as a wandb Table."""
        if not rows:
            return

        def _do() -> None:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

        self._safe("table", _do)

    def histogram(self, values: Any) -> Any:
        import wandb

        return wandb.Histogram(values)

    def summary(self, values: dict[str, Any]) -> None:
        self._safe("summary", lambda: self.run.summary.update(values))

    def define_metrics(self) -> None:
        """Make ``epoch`` the x-axis of val metrics and keep the best val top-1 in the summary."""

        def _do() -> None:
            self.run.define_metric("epoch")
            self.run.define_metric("val/*", step_metric="epoch")
            self.run.define_metric("val/top1", summary="max")

        self._safe("define_metric", _do)

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


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
