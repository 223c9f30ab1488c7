"""The report's tables: run directories read, grouped by configuration, summarised over seeds, compared,
rendered as markdown and plotted; failed jobs recorded (:class:`RecordFailure`)."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..stats import Comparison, Summary, compare, describe
from ..track.naming import NOT_CONFIG

__all__ = [
    "ERROR_LOG",
    "RecordFailure",
    "Reference",
    "Row",
    "Run",
    "collect_runs",
    "compare_rows",
    "failed_section",
    "markdown_table",
    "pick_baselines",
    "plot",
    "render",
    "summarise",
    "table_cells",
    "varying_keys",
]

log = logging.getLogger("xnorpp.report")

ERROR_LOG = "error.log"  # written into a failed job's directory by RecordFailure
LAUNCH = "launch"  # the pseudo-key of the PATH a run was found under
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
    launch: str = ""  # the report PATH this run was found under (a short label)

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
        """The launch, a group choice, a command-line value, or the value at a dotted key of the config."""
        if key == LAUNCH:
            return self.launch
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
        if self.launch and keep(LAUNCH):
            key[LAUNCH] = self.launch
        return dict(sorted(key.items()))

    @property
    def reference(self) -> Reference | None:
        """The paper number the run's preset reproduces (its ``reference`` config node), if any."""
        return Reference.from_config(self.config.get("reference"))

    def deviations(self, ref: Reference) -> list[str]:
        """How this run differs from the recipe behind ``ref``: other data, fewer epochs, capped epochs."""
        out = []
        data = self.lookup("data.name")
        if ref.data and data != ref.data:
            out.append(f"data {data or '?'}, not {ref.data}")
        epochs = self.metric("epochs")
        if ref.epochs and (epochs is None or epochs < ref.epochs):
            out.append(f"{'?' if epochs is None else int(epochs)} of {ref.epochs} epochs")
        limit = self.lookup("trainer.limit_train_batches")
        if limit not in (None, "None", "null"):
            out.append(f"{limit} batches per epoch")
        return out


@dataclass(frozen=True)
class Reference:
    """A published top-1 (percent) and where it comes from; ``data`` and ``epochs`` describe its recipe.

    Read from an experiment preset's ``reference`` node (``top1``, ``source``, ``data``, ``epochs``).
    """

    top1: float
    source: str
    data: str | None = None
    epochs: int | None = None

    @classmethod
    def from_config(cls, node: Any) -> Reference | None:
        """None when there is no node; a node without a numeric ``top1`` is an error naming the fix."""
        if node is None:
            return None
        top1 = node.get("top1") if isinstance(node, dict) else None
        if isinstance(top1, bool) or not isinstance(top1, (int, float)):
            raise ValueError(
                f"the config's reference node {node!r} has no numeric top1: give the preset "
                "reference: {top1: <percent>, source: <paper, table>, data: <data name>, epochs: <n>}"
            )
        epochs = node.get("epochs")
        return cls(float(top1), str(node.get("source") or "?"), node.get("data"),
                   int(epochs) if epochs is not None else None)  # fmt: skip


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


def launch_labels(paths: Sequence[Path]) -> list[str]:
    """Short names for the report PATHs: the fewest trailing path parts that tell them apart."""
    resolved = [p.resolve() for p in paths]
    for k in range(1, max((len(p.parts) for p in resolved), default=0) + 1):
        labels = ["/".join(p.parts[-k:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


def collect_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every job directory (one with ``.hydra/overrides.yaml``) under ``paths``, failed ones included;
    not the copies inside a job (its wandb run keeps ``.hydra/`` among its files).

    Each run's ``launch`` is the label of the first PATH it was found under (see :func:`launch_labels`).
    """
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    launch: dict[Path, str] = {}
    for path, label in zip(unique, launch_labels(unique)):
        found = {p.parent.parent.resolve() for p in path.rglob(".hydra/overrides.yaml")}
        if (path / ".hydra" / "overrides.yaml").is_file():
            found.add(path)
        for job in sorted(found, key=_job_order):
            if not any(parent in found for parent in job.parents):
                launch.setdefault(job, label)
    runs = []
    for job in launch:  # PATH order, then job order
        try:
            run = _read_run(job)
        except Exception as e:  # anything odd in one job directory must not stop the report
            run = Run(path=job, problem=f"unreadable job directory ({type(e).__name__}: {e})")
        run.launch = launch[job]
        runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One configuration: its key, its successful runs and their statistics over seeds."""

    config: dict[str, str]
    runs: list[Run]
    top1: Summary  # best val top-1 over seeds
    top5_mean: float | None
    img_per_s: float | None
    epochs: list[int]
    reference: Reference | None = None
    deviations: list[str] = field(default_factory=list)  # how the runs differ from the reference's recipe

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def values(self) -> list[float]:
        """Best val top-1 of each run, in the order of :attr:`runs`."""
        return [_top1(r) for r in self.runs]

    @property
    def top1_mean(self) -> float:
        return self.top1.mean

    @property
    def top1_std(self) -> float | None:
        return self.top1.std

    @property
    def gap(self) -> float | None:
        """Mean best val top-1 minus the reference's top-1."""
        return None if self.reference is None else self.top1.mean - self.reference.top1

    def label(self, keys: Sequence[str]) -> str:
        return " ".join(f"{k}={self.config.get(k, '-')}" for k in keys) or "all runs"


def _top1(run: Run) -> float:
    value = run.metric("best/val/top1", "val/top1")
    assert value is not None, "summarise() takes successful runs only"
    return value


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _row(config: dict[str, str], members: list[Run]) -> Row:
    members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0))
    try:
        reference = members[0].reference
    except ValueError as e:
        raise ValueError(f"{members[0].path / '.hydra' / 'config.yaml'}: {e}") from None
    deviations = list(dict.fromkeys(d for r in members for d in r.deviations(reference))) if reference else []
    return Row(
        config=config,
        runs=members,
        top1=describe([_top1(r) for r in members]),
        top5_mean=_mean(r.metric("best/val/top5", "val/top5") for r in members),
        img_per_s=_mean(r.metric("train/img_per_s") for r in members),
        epochs=sorted({int(e) for r in members if (e := r.metric("epochs")) is not None}),
        reference=reference,
        deviations=deviations,
    )


def summarise(runs: Iterable[Run], by: Sequence[str] | None = None, ignore: Iterable[str] = ()) -> list[Row]:
    """Group the successful runs by configuration; rows sorted by mean best val top-1, best first.

    When the launch is part of the key, a configuration's launches stay together (in PATH order).
    """
    ignore = tuple(ignore)
    groups: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(tuple(run.config_key(by, ignore).items()), []).append(run)
    rows = sorted((_row(dict(key), members) for key, members in groups.items()), key=lambda r: -r.top1.mean)
    launches = list(dict.fromkeys(r.runs[0].launch for r in rows))
    if len({row.config.get(LAUNCH) for row in rows}) < 2:
        return rows

    def rest(row: Row) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in row.config.items() if k != LAUNCH)

    best: dict[tuple[tuple[str, str], ...], float] = {}
    for row in rows:
        best.setdefault(rest(row), row.top1.mean)
    order = {launch: i for i, launch in enumerate(sorted(launches, key=_launch_order(runs)))}
    return sorted(rows, key=lambda r: (-best[rest(r)], rest(r), order[r.runs[0].launch]))


def _launch_order(runs: Iterable[Run]) -> Any:
    first: dict[str, int] = {}
    for i, run in enumerate(runs):
        first.setdefault(run.launch, i)
    return lambda launch: first.get(launch, len(first))


def varying_keys(rows: Sequence[Row]) -> list[str]:
    """The configuration keys whose value differs between rows (what the table needs to show)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.config if k not in keys]
    varying = [k for k in keys if len({row.config.get(k) for row in rows}) > 1]
    if LAUNCH in varying:  # the launch first: it is what a comparison of launches is about
        varying = [LAUNCH, *(k for k in varying if k != LAUNCH)]
    if varying or not rows:
        return varying
    return [k for k in ("binarization", "scale") if k in rows[0].config] or keys[:2]


# ------------------------------------------------------------------------------------------- baselines
def _parse_spec(rows: Sequence[Row], spec: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items, or bare values that name exactly one key's value (``fp``)."""
    keys = list(dict.fromkeys(k for row in rows for k in row.config))
    wanted: dict[str, str] = {}
    for item in spec:
        key, eq, value = item.partition("=")
        if not eq:
            value = item
            owners = [k for k in keys if any(row.config.get(k) == value for row in rows)]
            if len(owners) != 1:
                why = "no configuration has" if not owners else f"{', '.join(owners)} all have"
                raise ValueError(
                    f"--baseline {item}: {why} the value {value!r}; name the key, e.g. "
                    f"--baseline {(owners or keys or ['KEY'])[0]}={value} (keys: {', '.join(keys)})"
                )
            key = owners[0]
        elif key not in keys:
            raise ValueError(f"--baseline {item}: no configuration key {key!r}; keys: {', '.join(keys)}")
        elif not any(row.config.get(key) == value for row in rows):
            values = sorted({row.config.get(key, "-") for row in rows})
            raise ValueError(
                f"--baseline {item}: no configuration has {key}={value}; values: {', '.join(values)}"
            )
        wanted[key] = value
    return wanted


def pick_baselines(rows: Sequence[Row], spec: Sequence[str]) -> list[Row | None]:
    """The row each row is compared with, for ``--baseline`` items like ``binarization=fp`` or ``fp``.

    If one configuration matches ``spec`` it is every row's baseline. If several do (``scale=none``
    over several binarizations, ``launch=before`` over several configurations), each row is compared
    with the matching row that agrees with it on every other key; None where there is none.
    """
    wanted = _parse_spec(rows, spec)
    matching = [row for row in rows if all(row.config.get(k) == v for k, v in wanted.items())]
    if not matching:
        raise ValueError(f"--baseline {' '.join(spec)}: no configuration matches all of it")
    if len(matching) == 1:
        return [matching[0]] * len(rows)
    out: list[Row | None] = []
    for row in rows:
        other = {k: v for k, v in row.config.items() if k not in wanted}
        found = [m for m in matching if {k: v for k, v in m.config.items() if k not in wanted} == other]
        out.append(found[0] if found else None)
    return out


def compare_rows(rows: Sequence[Row], baselines: Sequence[Row | None]) -> list[Comparison | None]:
    """Each row against its baseline (None for the baseline itself and rows without one)."""
    return [
        None if base is None or base is row else compare(row.values, base.values, row.seeds, base.seeds)
        for row, base in zip(rows, baselines)
    ]


# ------------------------------------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(c: Comparison) -> str:
    if c.p is None:
        return f"- ({c.note})"
    return f"{'<0.001' if c.p < 0.001 else f'{c.p:.3f}'} ({c.test})"


def table_cells(
    rows: Sequence[Row], keys: Sequence[str], baselines: Sequence[Row | None] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table (markdown and HTML share them)."""
    head = [*keys, "seeds", "n", "best top-1 mean", "std", "95% CI", "min", "max"]
    comparisons = compare_rows(rows, baselines) if baselines is not None else None
    if comparisons is not None:
        head += ["Δ vs baseline", "p (test)"]
    with_ref = any(row.reference for row in rows)
    if with_ref:
        head += ["paper top-1", "gap", "vs recipe"]
    head += ["best top-5 mean", "epochs", "img/s"]
    lines = []
    for i, row in enumerate(rows):
        top1 = row.top1
        ci = "-" if top1.ci is None else f"[{top1.ci[0]:.2f}, {top1.ci[1]:.2f}]"
        seeds = ",".join("?" if s is None else str(s) for s in row.seeds)
        cells = [
            *(row.config.get(k, "-") for k in keys),
            seeds,
            str(row.n),
            _fmt(top1.mean),
            _fmt(top1.std),
            ci,
            _fmt(top1.min),
            _fmt(top1.max),
        ]
        if comparisons is not None and baselines is not None:
            c = comparisons[i]
            if baselines[i] is row:
                cells += ["baseline", "-"]
            elif c is None:
                cells += ["-", "- (no counterpart)"]
            else:
                cells += [f"{c.diff:+.2f}", _p(c)]
        if with_ref:
            ref = row.reference
            mark = "*" if row.deviations else ""
            if ref is None:
                cells += ["-", "-", "-"]
            else:
                cells += [
                    f"{ref.top1:.1f}",
                    f"{row.gap:+.2f}{mark}",
                    "; ".join(row.deviations) or "as recipe",
                ]
        epochs = "-" if not row.epochs else "-".join(str(e) for e in sorted({row.epochs[0], row.epochs[-1]}))
        cells += [_fmt(row.top5_mean), epochs, _fmt(row.img_per_s, 0)]
        lines.append(cells)
    return head, lines


def markdown_table(rows: Sequence[Row], keys: Sequence[str] | None = None,
                   baselines: Sequence[Row | None] | None = None) -> str:  # fmt: skip
    """One line per configuration; ``keys`` are its label columns (default: the ones that vary)."""
    keys = list(keys) if keys is not None else varying_keys(rows)
    head, lines = table_cells(rows, keys, baselines)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in lines]
    return "\n".join(out)


def legend(
    rows: Sequence[Row], keys: Sequence[str], baselines: Sequence[Row | None] | None = None
) -> list[str]:
    """The sentences that say what the table's columns mean (and the sources of paper numbers)."""
    out = [
        "Best val top-1 in percent over seeds: mean, sample standard deviation, 95% confidence interval of "
        "the mean (Student t), min and max; `-` where one seed gives no spread."
    ]
    if baselines is not None:
        tests = sum(c is not None for c in compare_rows(rows, baselines))
        bases = list(dict.fromkeys(id(b) for b in baselines if b is not None))
        if len(bases) == 1:
            base = next(b for b in baselines if b is not None).label(keys)
        else:  # one baseline row per group: say what they have in common
            chosen = [b for b in baselines if b is not None]
            common = [k for k in keys if len({b.config.get(k) for b in chosen}) == 1]
            same = " ".join(f"{k}={chosen[0].config.get(k)}" for k in common)
            base = f"the row with {same} and the same other keys"
        if None in baselines:
            base += "; no counterpart: no baseline row agrees with it on the other keys (`--ignore KEY`"
            base += " drops a key)"
        out.append(
            f"Δ: mean minus the mean of the baseline ({base}); p: two-sided t-test over seeds, "
            f"paired by seed where both ran the same seeds, else Welch's ({tests} test{'s' * (tests != 1)}, "
            "not corrected for multiple comparisons); p >= 0.05 means the seeds show no difference, not that "
            "there is none."
        )
    refs = {(r.reference.top1, r.reference.source): r for r in rows if r.reference}
    if refs:
        text = "paper top-1: the number the run's experiment preset reproduces; gap: mean minus it"
        if any(r.deviations for r in rows):
            text += (
                "; `*`: the runs differ from that number's recipe (vs recipe), so the gap is no reproduction "
                "result"
            )
        out.append(text + ". Sources:")
        out += [f"- {top1:.1f}: {source}" for top1, source in refs]
    return out


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
            parts[-1] += f"\n- error: `{last_error_line(run.error)}`"
            parts.append(
                "Traceback (end):\n\n```text\n" + "\n".join(run.error.splitlines()[-LOG_LINES:]) + "\n```"
            )
        if run.log_tail:
            parts.append("End of the log:\n\n```text\n" + "\n".join(run.log_tail) + "\n```")
        elif not run.error:
            parts.append("(no log lines)")
    return "\n\n".join(parts)


def last_error_line(error: str) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    last = [line for line in error.splitlines() if line.strip()]
    return last[-1].strip() if last else "?"


def render(
    rows: Sequence[Row],
    runs: Sequence[Run],
    title: str,
    image: str | None = None,
    keys: Sequence[str] | None = None,
    baselines: Sequence[Row | None] | None = None,
) -> str:
    """The whole report: title, table and what its columns mean, plot link, failed runs."""
    keys = list(keys) if keys is not None else varying_keys(rows)
    ok = sum(r.ok for r in runs)
    parts = [
        f"# {title}",
        f"{ok} finished runs in {len(rows)} configurations, {len(runs) - ok} failed.",
        markdown_table(rows, keys, baselines) if rows else "(no finished runs)",
    ]
    if rows:
        parts.append("\n\n".join(legend(rows, keys, baselines)))
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
    """The report run's wandb group: ``logger.wandb.group`` if the sweep set one, else ``<task_name>/report``
    (the jobs' groups are one per configuration, ``<task_name>/<configuration>``)."""
    wandb_cfg = (run.config.get("logger") or {}).get("wandb") or {}
    return str(wandb_cfg.get("group") or f"{run.config.get('task_name', 'train')}/report")


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
        launches = sorted({r.sweep_dir.name for r in runs})
        tracker = WandbTracker(
            mode=mode if mode in ("offline", "online", "disabled") else "offline",
            project=str(wandb_cfg.get("project") or "xnorpp"), entity=wandb_cfg.get("entity"), group=group,
            name=f"report-{'+'.join(launches)}" if launches else "report", job_type="report", dir=out_dir,
            tags=["report", *(f"launch:{launch}" for launch in launches)],
            config={"paths": sorted({str(r.sweep_dir) for r in runs}), "keys": list(keys)},
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
