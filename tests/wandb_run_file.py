"""Read an offline wandb run file (``run-*.wandb``) back: what the dashboard will show after ``wandb sync``.

The records come from :func:`xnorpp.track.wandb_file.read_records`; this helper keeps what the tests
compare with the dashboard.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xnorpp.track.wandb_file import read_records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class RunFile:
    """The parts of one run file a dashboard shows: run record, history rows, summary, metrics, files."""

    run: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # key or glob -> MetricRecord
    files: list[str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> RunFile:
        out = cls()
        for r in read_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out.run = r.run
            elif kind == "history":
                out.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                for u in r.summary.update:
                    out.summary[_key(u)] = json.loads(u.value_json)
            elif kind == "metric":
                out.metrics[r.metric.name or r.metric.glob_name] = r.metric
            elif kind == "files":
                out.files += [f.path for f in r.files.files]
            elif kind == "exit":
                out.exit_codes.append(r.exit.exit_code)
        return out

    @classmethod
    def of_run_dir(cls, run_dir: Path, wait_s: float = 60.0) -> list[RunFile]:
        """Every wandb run file under ``<run dir>/wandb``, oldest first (one per process that logged).

        wandb's service process writes the file and may finish it a moment after the run's process
        returns: wait (up to ``wait_s``) until the newest file holds its exit record."""
        deadline = time.monotonic() + wait_s
        while True:
            files = [cls.read(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
            if (files and files[-1].exit_codes) or time.monotonic() > deadline:
                return files
            time.sleep(0.2)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]
