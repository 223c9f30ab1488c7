"""Tabulate sweeps offline: ``python -m xnorpp.report PATH [PATH ...] [--by KEY ...] [--plot FILE] [--wandb]``.

Reads every job directory under the PATHs (a directory with ``.hydra/overrides.yaml``: a multirun
directory, a folder of several, or single runs), groups the runs by configuration (their group choices
and command-line values, minus ``seed`` and settings that do not change results) and writes

- a markdown table, one row per configuration: mean and sample standard deviation over seeds of the
  best val top-1, the mean best val top-5, number of seeds, epochs and training images/s
  (``PATH/report.md``, also printed);
- a plot of val top-1 per epoch, mean over seeds with the min-max band (``PATH/report.png``);
- a "failed runs" section for jobs without a usable ``results.json``, with their overrides, the error a
  sweep preset's :class:`RecordFailure` callback saved, and the end of their log.

``--by binarization scale`` groups by those keys only (a group choice, a command-line key or any dotted
config key such as ``optimizer.lr``). ``--wandb`` also logs the table and the plot as a wandb run with
job_type ``report`` in the sweep's group (offline unless ``WANDB_MODE`` says otherwise). Accuracy is in
percent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .track.naming import NOT_CONFIG

__all__ = [
    "ERROR_LOG",
    "RecordFailure",
    "Row",
    "Run",
    "collect_runs",
    "failed_section",
    "main",
    "markdown_table",
    "plot",
    "render",
    "summarise",
    "varying_keys",
]

log = logging.getLogger("xnorpp.report")

ERROR_LOG = "error.log"  # written into a failed job's directory by RecordFailure
LOG_LINES = 12

try:
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML without libyaml
    _Loader = yaml.SafeLoader


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """One job directory: its overrides, group choices, config, results (None if it failed) and log."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    problem: str | None = None  # why the run is not usable, e.g. "no results.json"
    error: str | None = None  # traceback saved by RecordFailure
    log_tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None and self.results is not None

    @property
    def params(self) -> dict[str, str]:
        """Command-line overrides as ``key: value`` (``+``/``++``/``~`` prefixes dropped)."""
        out: dict[str, str] = {}
        for item in self.overrides:
            key, _, value = str(item).partition("=")
            out[key.lstrip("+~")] = value
        return out

    @property
    def seed(self) -> int | None:
        value = self.params.get("seed", self.config.get("seed"))
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    @property
    def sweep_dir(self) -> Path:
        """The multirun directory holding this job (the nearest one with ``multirun.yaml``)."""
        for parent in self.path.parents:
            if (parent / "multirun.yaml").is_file():
                return parent
        return self.path.parent

    def lookup(self, key: str) -> str | None:
        """A group choice, else a command-line value, else the value at a dotted key of the config."""
        if key in self.choices:
            return self.choices[key]
        params = self.params
        if key in params:
            return params[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return None if isinstance(node, (dict, list)) else str(node)

    def metric(self, key: str, fallback: str | None = None) -> float | None:
        """A finite number from results.json (``best/*`` of -1 means never evaluated)."""
        for k in (key, fallback):
            value = (self.results or {}).get(k) if k else None
            if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
                return float(value)
        return None

    def config_key(self, by: Sequence[str] | None = None, ignore: Iterable[str] = ()) -> dict[str, str]:
        """What makes this run's configuration: ``by`` keys, or all choices and values but the ignored."""
        if by:
            return {k: str(self.lookup(k)) for k in by}
        skip = (*NOT_CONFIG, *ignore)

        def keep(k: str) -> bool:
            return not k.startswith("hydra/") and not any(k == s or k.startswith(s + ".") for s in skip)

        key = {k: str(v) for k, v in self.choices.items() if v is not None and v != "None" and keep(k)}
        key.update({k: v for k, v in self.params.items() if k not in self.choices and keep(k)})
        return dict(sorted(key.items()))


def _read_yaml(path: Path) -> Any:
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


def _tail(path: Path, n: int = LOG_LINES) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


def _read_run(job: Path) -> Run:
    run = Run(path=job)
    hydra_dir = job / ".hydra"
    try:
        run.overrides = [str(o) for o in (_read_yaml(hydra_dir / "overrides.yaml") or [])]
    except (OSError, yaml.YAMLError) as e:
        run.problem = f"unreadable .hydra/overrides.yaml ({type(e).__name__})"
    try:
        config = _read_yaml(hydra_dir / "config.yaml")
        run.config = config if isinstance(config, dict) else {}
    except (OSError, yaml.YAMLError):
        run.config = {}
    results_path = job / "results.json"
    if not results_path.is_file():
        run.problem = run.problem or "no results.json (the job failed, was killed, or is still running)"
    else:
        try:
            results = json.loads(results_path.read_text())
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
            run.results = results
            if run.metric("best/val/top1", "val/top1") is None:
                run.problem = run.problem or "results.json has no val/top1"
        except (OSError, ValueError) as e:
            run.problem = run.problem or f"unreadable results.json ({type(e).__name__}: {e})"
    choices = (run.results or {}).get("choices")
    if not isinstance(choices, dict) or not choices:
        try:
            hydra_cfg = _read_yaml(hydra_dir / "hydra.yaml") or {}
            choices = hydra_cfg["hydra"]["runtime"]["choices"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            choices = {}
    if not isinstance(choices, dict):
        choices = {}
    run.choices = {str(k): str(v) for k, v in choices.items() if v is not None}
    if not run.ok:
        error_file = job / ERROR_LOG
        if error_file.is_file():
            run.error = "\n".join(_tail(error_file, 40))
        logs = sorted((p for p in job.glob("*.log") if p.name != ERROR_LOG), key=lambda p: p.stat().st_mtime)
        if logs:
            run.log_tail = _tail(logs[-1])
    return run


def _job_order(job: Path) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in job.parts)


def collect_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every job directory (one with ``.hydra/overrides.yaml``) under ``paths``, failed ones included."""
    jobs: set[Path] = set()
    for path in map(Path, paths):
        if (path / ".hydra" / "overrides.yaml").is_file():
            jobs.add(path.resolve())
        jobs.update(p.parent.parent.resolve() for p in path.rglob(".hydra/overrides.yaml"))
    runs = []
    for job in sorted(jobs, key=_job_order):
        try:
            runs.append(_read_run(job))
        except Exception as e:  # anything odd in one job directory must not stop the report
            runs.append(Run(path=job, problem=f"unreadable job directory ({type(e).__name__}: {e})"))
    return runs


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One configuration: its key, its successful runs and their statistics over seeds."""

    config: dict[str, str]
    runs: list[Run]
    top1_mean: float
    top1_std: float | None  # sample standard deviation; None for a single run
    top5_mean: float | None
    img_per_s: float | None
    epochs: list[int]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def label(self, keys: Sequence[str]) -> str:
        return " ".join(f"{k}={self.config.get(k, '-')}" for k in keys) or "all runs"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarise(runs: Iterable[Run], by: Sequence[str] | None = None, ignore: Iterable[str] = ()) -> list[Row]:
    """Group the successful runs by configuration; rows sorted by mean best val top-1, best first."""
    ignore = tuple(ignore)
    groups: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(tuple(run.config_key(by, ignore).items()), []).append(run)
    rows = []
    for key, members in groups.items():
        top1 = [r.metric("best/val/top1", "val/top1") for r in members]
        values = [v for v in top1 if v is not None]
        rows.append(
            Row(
                config=dict(key),
                runs=sorted(members, key=lambda r: (r.seed is None, r.seed or 0)),
                top1_mean=statistics.fmean(values),
                top1_std=statistics.stdev(values) if len(values) > 1 else None,
                top5_mean=_mean(r.metric("best/val/top5", "val/top5") for r in members),
                img_per_s=_mean(r.metric("train/img_per_s") for r in members),
                epochs=sorted({int(e) for r in members if (e := r.metric("epochs")) is not None}),
            )
        )
    return sorted(rows, key=lambda r: -r.top1_mean)


def varying_keys(rows: Sequence[Row]) -> list[str]:
    """The configuration keys whose value differs between rows (what the table needs to show)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.config if k not in keys]
    varying = [k for k in keys if len({row.config.get(k) for row in rows}) > 1]
    if varying or not rows:
        return varying
    return [k for k in ("binarization", "scale") if k in rows[0].config] or keys[:2]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row], keys: Sequence[str] | None = None) -> str:
    """One line per configuration; ``keys`` are its label columns (default: the ones that vary)."""
    keys = list(keys) if keys is not None else varying_keys(rows)
    head = [*keys, "seeds", "n", "best top-1 mean", "best top-1 std", "best top-5 mean", "epochs", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        epochs = "-" if not row.epochs else "-".join(str(e) for e in sorted({row.epochs[0], row.epochs[-1]}))
        seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
        cells = [*(row.config.get(k, "-") for k in keys), seeds, str(row.n), _fmt(row.top1_mean),
                 _fmt(row.top1_std), _fmt(row.top5_mean), epochs, _fmt(row.img_per_s, 0)]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def failed_section(runs: Iterable[Run]) -> str:
    """Markdown for runs without usable results: path, overrides, reason, error and end of the log."""
    failed = [r for r in runs if not r.ok]
    if not failed:
        return ""
    parts = [f"## Failed runs ({len(failed)})"]
    for run in failed:
        parts.append(
            f"### `{run.path}`\n\n- overrides: `{' '.join(run.overrides) or '(none)'}`\n- {run.problem}"
        )
        if run.error:
            last = [line for line in run.error.splitlines() if line.strip()]
            parts[-1] += f"\n- error: `{last[-1].strip() if last else '?'}`"
            parts.append(
                "Traceback (end):\n\n```text\n" + "\n".join(run.error.splitlines()[-LOG_LINES:]) + "\n```"
            )
        if run.log_tail:
            parts.append("End of the log:\n\n```text\n" + "\n".join(run.log_tail) + "\n```")
        elif not run.error:
            parts.append("(no log lines)")
    return "\n\n".join(parts)


def render(rows: Sequence[Row], runs: Sequence[Run], title: str, image: str | None = None,
           keys: Sequence[str] | None = None) -> str:  # fmt: skip
    """The whole report: title, table, plot link, failed runs."""
    ok = sum(r.ok for r in runs)
    parts = [
        f"# {title}",
        f"{ok} finished runs in {len(rows)} configurations, {len(runs) - ok} failed. Accuracy in percent; "
        "std is the sample standard deviation over seeds (- for one seed).",
        markdown_table(rows, keys) if rows else "(no finished runs)",
    ]
    if image:
        parts.append(f"![val top-1 per epoch]({image})")
    section = failed_section(runs)
    if section:
        parts.append(section)
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ plot
def _curve(run: Run) -> dict[int, float]:
    """Val top-1 by epoch from the run's history (its final value if there is no history)."""
    points: dict[int, float] = {}
    for h in (run.results or {}).get("history") or []:
        try:
            points[int(h["epoch"])] = float(h["val/top1"])
        except (KeyError, TypeError, ValueError):  # an epoch without validation (val_every > 1)
            continue
    final, epochs = run.metric("val/top1"), run.metric("epochs")
    if not points and final is not None:
        points[int(epochs or 0)] = final
    return points


def plot(rows: Sequence[Row], path: str | Path, keys: Sequence[str] | None = None, title: str = "") -> Path:
    """Val top-1 per epoch, one line per configuration: mean over seeds, min-max band; writes a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in workers and tests

    keys = list(keys) if keys is not None else varying_keys(rows)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for row in rows:
        curves = [_curve(r) for r in row.runs]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        values = [[c[e] for c in curves if e in c] for e in epochs]
        mean = [statistics.fmean(v) for v in values]
        (line,) = ax.plot(
            epochs, mean, marker="o" if len(epochs) < 20 else None, label=f"{row.label(keys)} (n={row.n})"
        )
        if row.n > 1:
            ax.fill_between(
                epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color()
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title or "val top-1: mean over seeds, band min-max")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------ wandb
def wandb_group(run: Run) -> str:
    """The group run.py gave the sweep's jobs: ``logger.wandb.group`` or ``<task_name>-<sweep dir name>``."""
    wandb_cfg = (run.config.get("logger") or {}).get("wandb") or {}
    return str(wandb_cfg.get("group") or f"{run.config.get('task_name', 'train')}-{run.sweep_dir.name}")


def log_to_wandb(rows: Sequence[Row], runs: Sequence[Run], keys: Sequence[str], image: Path | None,
                 out_dir: Path) -> str | None:  # fmt: skip
    """Log the table (and plot) as a wandb run (job_type report) in the sweep's group; never raises."""
    try:
        from xnorpp.track import WandbTracker

        first = runs[0].config if runs else {}
        wandb_cfg = (first.get("logger") or {}).get("wandb") or {}
        env_mode = os.environ.get("WANDB_MODE", "offline")
        mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
        group = wandb_group(runs[0]) if runs else None
        tracker = WandbTracker(
            mode=mode if mode in ("offline", "online", "disabled") else "offline",
            project=str(wandb_cfg.get("project") or "xnorpp"), entity=wandb_cfg.get("entity"), group=group,
            name=f"report-{group}" if group else "report", job_type="report", dir=out_dir,
            tags=["report"], config={"paths": sorted({str(r.sweep_dir) for r in runs}), "keys": list(keys)},
        )  # fmt: skip
        tracker.log_table(
            "report/table",
            [{**{k: row.config.get(k, "-") for k in keys}, "n": row.n, "seeds": ",".join(map(str, row.seeds)),
              "best_top1_mean": row.top1_mean, "best_top1_std": row.top1_std, "best_top5_mean": row.top5_mean,
              "img_per_s": row.img_per_s} for row in rows],
        )  # fmt: skip
        if image is not None and tracker.enabled:
            import wandb

            tracker.log({"report/val_top1": wandb.Image(str(image))})
        if rows:
            tracker.summary({"best_top1_mean": rows[0].top1_mean, "configurations": len(rows),
                             "failed_runs": sum(not r.ok for r in runs)})  # fmt: skip
        run_dir = tracker.run_dir
        tracker.finish()
        return run_dir
    except Exception as e:  # wandb missing, broken or offline: the report itself is already written
        log.warning("wandb report failed (%s: %s)", type(e).__name__, e)
        return None


# --------------------------------------------------------------------------------------- hydra callback
try:
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep the report usable without it
    Callback = object  # type: ignore[assignment,misc]


class RecordFailure(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: a job that raises writes its traceback to ``<job dir>/error.log``.

    Hydra's launchers catch a job's exception and keep going; the traceback otherwise only reaches the
    launching process's stderr. Enable with ``hydra.callbacks.record_failure._target_=xnorpp.report.RecordFailure``
    (the sweep presets do).
    """

    def on_job_end(self, config: Any, job_return: JobReturn, **kwargs: Any) -> None:
        try:
            if job_return.status != JobStatus.FAILED:
                return
            err = job_return._return_value
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            out = Path(str(config.hydra.runtime.output_dir)) / ERROR_LOG
            out.write_text(text)
        except Exception as e:  # a callback must never break the sweep
            log.warning("could not record the failure (%s: %s)", type(e).__name__, e)


# ------------------------------------------------------------------------------------------------- cli
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xnorpp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="multirun directories (or folders of them)")
    parser.add_argument("--by", nargs="+", action="extend", metavar="KEY", help="group by these keys only")
    parser.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="KEY",
                        help="also ignore these keys when grouping (e.g. data.image_size)")  # fmt: skip
    parser.add_argument("--plot", type=Path, metavar="FILE", help="PNG to write (default: PATH/report.png)")
    parser.add_argument("--wandb", action="store_true", help="log table and plot to wandb (job_type report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such path: {', '.join(map(str, missing))}")
    runs = collect_runs(args.paths)
    if not runs:
        parser.error(
            f"no job directories (with .hydra/overrides.yaml) under {', '.join(map(str, args.paths))}"
        )
    out_dir = args.paths[0]
    rows = summarise(runs, args.by, args.ignore)
    keys = list(args.by) if args.by else varying_keys(rows)
    image = plot(rows, args.plot or out_dir / "report.png", keys, title=", ".join(p.name for p in args.paths))
    try:
        link = os.path.relpath(image, out_dir)
    except ValueError:  # another drive (Windows)
        link = str(image)
    text = render(rows, runs, f"Report: {', '.join(map(str, args.paths))}", link, keys)
    (out_dir / "report.md").write_text(text)
    print(text, end="")
    log.info("wrote %s and %s", out_dir / "report.md", image)
    if args.wandb:
        run_dir = log_to_wandb(rows, runs, keys, image, out_dir)
        if run_dir:
            log.info("wandb report run: %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
