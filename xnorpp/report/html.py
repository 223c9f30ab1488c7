"""One self-contained HTML page for a sweep report (``python -m xnorpp.report PATH --html FILE``).

No network, no server, no JavaScript: the charts are inline SVG, drawn here from what the run
directories hold. Per epoch (``results.json`` history): val top-1 and training throughput. Per
optimizer step (the run's wandb file, :mod:`xnorpp.track.wandb_file`): the learning rate
(``train/lr``) and the binarization health means (``health/<metric>``). A section whose data no run
recorded says so. Lines are means over a configuration's seeds, bands their min-max range.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import re
import shlex
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..track.naming import NOT_CONFIG
from ..track.wandb_file import history_rows, run_files
from .table import LAUNCH, Row, Run, last_error_line, legend, table_cells

__all__ = ["Series", "line_chart", "step_series", "write_html"]

log = logging.getLogger("xnorpp.report")

# Colour-blind-safe qualitative palette (Okabe & Ito), then darker variants for more configurations.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#000000",
    "#B8A800",
    "#004C7A",
    "#9A6B00",
    "#006B4E",
    "#8A4F72",
)
HEALTH = {
    "flip": "fraction of binary weights whose sign changed since the previous measurement",
    "frozen": "fraction of latent weights outside the estimator window |c| > 1 (no gradient)",
    "act_in_window": "fraction of binary-conv inputs inside |x| <= 1 (they pass gradient)",
    "scale_mean": "mean of the scale factor Gamma",
    "scale_std": "spread of the scale factor Gamma",
}
MAX_POINTS = 800  # per line; longer series are thinned evenly (the last point kept)


# ------------------------------------------------------------------------------------------------ svg
@dataclass
class Series:
    """One line of a chart, with an optional band (``lo``/``hi``, same length as ``x``)."""

    label: str
    color: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None


def _ticks(lo: float, hi: float, n: int = 6, integer: bool = False) -> tuple[list[float], list[str]]:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], and their
    labels with as many decimals as the step needs; ``integer`` keeps the step at 1 or more."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(step, 1.0)
    first = math.ceil(lo / step - 1e-9) * step
    values = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    if max(abs(lo), abs(hi)) >= 1e5 or 0 < step < 1e-4:
        return values, [f"{v:.1e}" if v else "0" for v in values]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return values, [f"{v:.{decimals}f}" for v in values]


def _thin(series: Series) -> Series:
    n = len(series.x)
    if n <= MAX_POINTS:
        return series
    keep = sorted({round(i * (n - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})

    def pick(values: list[float] | None) -> list[float] | None:
        return None if values is None else [values[i] for i in keep]

    return Series(
        series.label,
        series.color,
        pick(series.x) or [],
        pick(series.y) or [],
        pick(series.lo),
        pick(series.hi),
    )


def line_chart(
    series: Sequence[Series], *, title: str, xlabel: str, ylabel: str, width: int = 720, height: int = 300
) -> str:
    """An inline SVG line chart with axes, ticks, bands and per-point tooltips (``<title>``); x (epochs,
    steps) gets whole-number ticks."""
    series = [_thin(s) for s in series if s.x]
    left, right, top, bottom = 64, 16, 30, 44
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in (*s.y, *(s.lo or []), *(s.hi or []))]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>',
    ]
    for t, text in zip(*_ticks(y0, y1)):
        parts.append(f'<line class="grid" x1="{left}" x2="{left + w}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{text}</text>')
    for t, text in zip(*_ticks(x0, x1, 8, integer=True)):
        parts.append(f'<line class="grid" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + h}"/>')
        parts.append(
            f'<text class="tick" x="{px(t):.1f}" y="{top + h + 16}" text-anchor="middle">{text}</text>'
        )
    parts.append(f'<rect class="frame" x="{left}" y="{top}" width="{w}" height="{h}"/>')
    parts.append(
        f'<text class="axis" x="{left + w / 2}" y="{height - 8}" text-anchor="middle">'
        f"{html.escape(xlabel)}</text>"
    )
    parts.append(
        f'<text class="axis" transform="translate(14 {top + h / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(ylabel)}</text>"
    )
    for s in series:
        name = html.escape(s.label)
        if s.lo is not None and s.hi is not None and len(s.x) > 1 and any(a != b for a, b in zip(s.lo, s.hi)):
            edge = [f"{px(x):.1f},{py(v):.1f}" for x, v in zip(s.x, s.hi)]
            edge += [f"{px(x):.1f},{py(v):.1f}" for x, v in zip(reversed(s.x), reversed(s.lo))]
            parts.append(
                f'<polygon class="band" fill="{s.color}" points="{" ".join(edge)}"><title>{name}: '
                "min-max over seeds</title></polygon>"
            )
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.x, s.y))
        if len(s.x) > 1:
            parts.append(
                f'<polyline class="series" stroke="{s.color}" points="{points}">'
                f"<title>{name}</title></polyline>"
            )
        if len(s.x) <= 40:
            for x, y in zip(s.x, s.y):
                parts.append(
                    f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}">'
                    f"<title>{name}: {x:g}, {y:.4g}</title></circle>"
                )
    parts.append("</svg>")
    swatches = "".join(
        f'<span class="key"><i style="background:{s.color}"></i>{html.escape(s.label)}</span>' for s in series
    )
    return f"<figure>{''.join(parts)}<figcaption>{swatches}</figcaption></figure>"


# ----------------------------------------------------------------------------------------------- data
def _aggregate(label: str, color: str, curves: Sequence[Mapping[float, float]]) -> Series:
    """Mean and min-max over the runs' curves at every x any of them has."""
    xs = sorted({x for c in curves for x in c})
    values = [[c[x] for c in curves if x in c] for x in xs]
    return Series(
        label,
        color,
        xs,
        [statistics.fmean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def _epoch_curve(run: Run, *keys: str) -> dict[float, float]:
    """``history`` values by epoch from results.json: the first of ``keys`` a row has."""
    out: dict[float, float] = {}
    for h in (run.results or {}).get("history") or []:
        value = next((h[k] for k in keys if isinstance(h.get(k), (int, float))), None)
        if value is not None and isinstance(h.get("epoch"), (int, float)) and math.isfinite(value):
            out[float(h["epoch"])] = float(value)
    return out


def step_series(run: Run) -> dict[str, dict[float, float]]:
    """Per-step values from the run's wandb files: ``{key: {step: value}}`` for ``train/lr`` and
    ``health/<metric>``; the step is the row's ``global_step`` where logged, else wandb's ``_step``."""
    out: dict[str, dict[float, float]] = {}
    for path in run_files(run.path):
        try:
            rows = history_rows(path)
        except (OSError, ValueError, ImportError) as e:  # a broken file loses its curves, not the report
            log.warning("skipping %s (%s: %s)", path, type(e).__name__, e)
            continue
        for row in rows:
            step = row.get("global_step", row.get("_step"))
            if step is None:
                continue
            for key, value in row.items():
                if key == "train/lr" or (key.startswith("health/") and key.count("/") == 1):
                    out.setdefault(key, {})[step] = value
    return out


# ----------------------------------------------------------------------------------------------- page
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#1b1b1b;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:right;vertical-align:top}
table.summary td{white-space:nowrap}table.summary td.text{white-space:normal;max-width:18em;text-align:left}
.scroll{overflow-x:auto}
th{background:#f3f3f3}td.key,th.key{text-align:left}
code,pre{font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}
svg.chart text{font:11px system-ui,sans-serif;fill:#333}svg.chart text.title{font-size:13px;font-weight:600}
svg.chart .grid{stroke:#e6e6e6}svg.chart .frame{fill:none;stroke:#999}
svg.chart .series{fill:none;stroke-width:1.8}svg.chart .band{fill-opacity:.12;stroke:none}
figcaption{font-size:12px}.key{margin-right:12px;white-space:nowrap}
.key i{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}
.na{color:#7a4b00;background:#fff6e0;padding:6px 10px;border-left:3px solid #e0a000}
.meta{color:#555}details{margin:6px 0}
"""


def _inline(text: str) -> str:
    """Escape ``text`` and render its markdown code spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _not_recorded(what: str) -> str:
    return f'<p class="na">Not recorded: {_inline(what)}</p>'


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _flat(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``dotted.key: value`` strings."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {
        prefix[:-1]: yaml.safe_dump(node, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
    }


def _is_setting(key: str) -> bool:
    """A config key that can change what a run learns (not the seed, logging, paths, ...)."""
    skip = (*NOT_CONFIG, "output_dir", "task_name", "train")
    return not any(key == s or key.startswith(s + ".") for s in skip)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter, and the same on a
    laptop that got the folder by ``scp``), else as it is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _command(overrides: Iterable[str]) -> str:
    return " ".join(["python train.py", *(shlex.quote(str(o)) for o in overrides)])


def _launch_commands(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """``(launch, directory, command)`` for every multirun directory (or single run) of the report."""
    out, seen = [], set()
    for run in runs:
        where = run.sweep_dir if (run.sweep_dir / "multirun.yaml").is_file() else run.path
        if where in seen:
            continue
        seen.add(where)
        source = where / "multirun.yaml" if where != run.path else run.path / ".hydra" / "hydra.yaml"
        try:
            overrides = (yaml.safe_load(source.read_text()) or {})["hydra"]["overrides"]
            command = _command([*(overrides.get("task") or []), *(overrides.get("hydra") or [])])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            command = "(not recorded)"
        out.append((run.launch, _shown(where), command))
    return out


def _table_html(rows: Sequence[Row], keys: Sequence[str], baselines: Sequence[Row | None] | None) -> str:
    head, lines = table_cells(rows, keys, baselines)
    n_keys = len(keys)

    def kind(i: int) -> str:
        return " class=key" if i < n_keys else " class=text" if head[i] in ("p (test)", "vs recipe") else ""

    th = "".join(f"<th{kind(i)}>{html.escape(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{kind(i)}>{html.escape(c)}</td>" for i, c in enumerate(cells)) + "</tr>"
        for cells in lines
    )
    text = legend(rows, keys, baselines)
    notes = "".join(f"<p>{_inline(line)}</p>" for line in text if not line.startswith("- "))
    sources = [line[2:] for line in text if line.startswith("- ")]
    if sources:
        notes += "<ul>" + "".join(f"<li>{_inline(s)}</li>" for s in sources) + "</ul>"
    table = f'<table class="summary"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>{notes}'


def _charts_section(
    rows: Sequence[Row], keys: Sequence[str], steps: Mapping[str, dict[str, dict[float, float]]]
) -> str:
    labels = [row.label(keys) for row in rows]
    val = [
        _aggregate(lab, _color(i), [c for r in row.runs if (c := _epoch_curve(r, "val/top1"))])
        for i, (lab, row) in enumerate(zip(labels, rows))
    ]
    out = ["<h2>Val top-1 per epoch</h2>"]
    if any(s.x for s in val):
        out.append(
            line_chart(
                val,
                title="val top-1: mean over seeds, band min-max",
                xlabel="epoch",
                ylabel="val top-1 (%)",
                width=1000,
                height=380,
            )
        )
    else:
        out.append(_not_recorded("no run has a `history` with `val/top1` in its results.json"))

    out.append("<h2>Learning rate</h2>")
    lr = []
    for i, (lab, row) in enumerate(zip(labels, rows)):
        first = next((r for r in row.runs if steps[str(r.path)].get("train/lr")), None)
        if first is not None:
            lr.append(
                Series(f"{lab} (seed {first.seed})", _color(i), *_sorted(steps[str(first.path)]["train/lr"]))
            )
    if lr:
        out.append(
            line_chart(
                lr,
                title="learning rate per optimizer step (one seed per configuration)",
                xlabel="optimizer step",
                ylabel="lr",
                width=1000,
            )
        )
    else:
        out.append(
            _not_recorded(
                "no run has per-step `train/lr` in a wandb run file (runs with `logger=none` or wandb "
                "disabled "
                "write none)"
            )
        )

    out.append("<h2>Throughput</h2>")
    ips = [
        _aggregate(
            lab,
            _color(i),
            [c for r in row.runs if (c := _epoch_curve(r, "train_epoch/img_per_s", "train/img_per_s"))],
        )
        for i, (lab, row) in enumerate(zip(labels, rows))
    ]
    if any(s.x for s in ips):
        out.append(
            line_chart(
                ips,
                title="training images/s per epoch (per job): mean over seeds, band min-max",
                xlabel="epoch",
                ylabel="img/s",
                width=1000,
            )
        )
    else:
        out.append(_not_recorded("no run has training images/s in its results.json history"))

    out.append("<h2>Binarization health</h2>")
    metrics = list(
        dict.fromkeys(
            [*HEALTH, *(k.split("/", 1)[1] for s in steps.values() for k in s if k.startswith("health/"))]
        )
    )
    charts = []
    for metric in metrics:
        series = [
            _aggregate(
                lab, _color(i), [c for r in row.runs if (c := steps[str(r.path)].get(f"health/{metric}"))]
            )
            for i, (lab, row) in enumerate(zip(labels, rows))
        ]
        if any(s.x for s in series):
            chart = line_chart(
                series, title=metric, xlabel="optimizer step", ylabel=metric, width=560, height=260
            )
            charts.append(f'<div>{chart}<p class="meta">{_inline(HEALTH.get(metric, ""))}</p></div>')
    if charts:
        note = (
            "Means over the binary layers, logged every `trainer.health_every` steps; lines are means over "
            "seeds, bands min-max."
        )
        out.append(f'<p class="meta">{_inline(note)}</p>')
        out.append(f'<div class="charts">{"".join(charts)}</div>')
    else:
        out.append(
            _not_recorded(
                "no run has `health/<metric>` in a wandb run file (`trainer.health_every=0`, `logger=none`, "
                "or a "
                "network without binary layers)"
            )
        )
    return "\n".join(out)


def _sorted(points: Mapping[float, float]) -> tuple[list[float], list[float]]:
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def _failed_html(runs: Sequence[Run]) -> str:
    failed = [r for r in runs if not r.ok]
    if not failed:
        return "<h2>Failed runs (0)</h2><p>None.</p>"
    out = [f"<h2>Failed runs ({len(failed)})</h2>"]
    for run in failed:
        items = [
            f"<li>launch: <code>{html.escape(run.launch)}</code></li>" if run.launch else "",
            f"<li>command: <code>{html.escape(_command(run.overrides))}</code></li>",
            f"<li>{html.escape(run.problem or '')}</li>",
        ]
        if run.error:
            items.append(f"<li>error: <code>{html.escape(last_error_line(run.error))}</code></li>")
        out.append(f"<h3><code>{html.escape(_shown(run.path))}</code></h3><ul>{''.join(items)}</ul>")
        if run.error:
            out.append(
                f"<details open><summary>traceback</summary><pre>{html.escape(run.error)}</pre></details>"
            )
        if run.log_tail:
            out.append(
                f"<details><summary>end of the log</summary><pre>{html.escape(chr(10).join(run.log_tail))}"
                "</pre></details>"
            )
    return "\n".join(out)


def _configs_html(rows: Sequence[Row], keys: Sequence[str]) -> str:
    out = ["<h2>Configurations: commands and settings</h2>"]
    flat = [{k: v for k, v in _flat(row.runs[0].config).items() if _is_setting(k)} for row in rows]
    all_keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in all_keys if len({f.get(k) for f in flat}) > 1]
    if len(rows) > 1:
        head = "".join(f"<th>{html.escape(row.label(keys))}</th>" for row in rows)
        body = "".join(
            f'<tr><td class="key"><code>{html.escape(k)}</code></td>'
            + "".join(f"<td>{html.escape(f.get(k, '(absent)'))}</td>" for f in flat)
            + "</tr>"
            for k in differ
        )
        out.append(
            f"<p>Settings that differ between the configurations ({len(differ)} of {len(all_keys)} keys "
            "of the "
            "composed config; seed, logging and paths left out):</p>"
            + (
                f'<table class="diff"><thead><tr><th class="key">key</th>{head}</tr></thead>'
                f"<tbody>{body}</tbody>"
                "</table>"
                if differ
                else "<p>None: the configurations differ only in what the run directories leave out.</p>"
            )
        )
    for row in rows:
        runs = "".join(
            f"<li>seed {run.seed}: {_top1_text(run)} <code>{html.escape(_shown(run.path))}</code><br>"
            f"<code>{html.escape(_command(run.overrides))}</code></li>"
            for run in row.runs
        )
        config = yaml.safe_dump(row.runs[0].config, sort_keys=False, width=100)
        out.append(
            f"<h3>{html.escape(row.label(keys))}</h3><ul>{runs}</ul><details><summary>composed config (seed "
            f"{row.runs[0].seed})</summary><pre>{html.escape(config)}</pre></details>"
        )
    return "\n".join(out)


def _top1_text(run: Run) -> str:
    value = run.metric("best/val/top1", "val/top1")
    return "-" if value is None else f"best val top-1 {value:.2f}"


def write_html(
    path: str | Path,
    rows: Sequence[Row],
    runs: Sequence[Run],
    keys: Sequence[str],
    baselines: Sequence[Row | None] | None = None,
    title: str = "Report",
) -> Path:
    """Write the report page to ``path`` and return it."""
    steps = {str(r.path): step_series(r) for row in rows for r in row.runs}
    ok = sum(r.ok for r in runs)
    launches = _launch_commands(runs)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    launch_items = "".join(
        f"<li>{f'<b>{html.escape(label)}</b>: ' if len({lab for lab, _, _ in launches}) > 1 else ''}"
        f"<code>{html.escape(where)}</code><br><code>{html.escape(command)}</code></li>"
        for label, where, command in launches
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{ok} finished runs in {len(rows)} configurations, {len(runs) - ok} failed. '
        f"Written {when} by xnorpp {__version__}; accuracy in percent.</p>",
        f"<h2>Launches</h2><ul>{launch_items}</ul>",
        "<h2>Summary</h2>",
        _table_html(rows, keys, baselines) if rows else "<p>No finished runs.</p>",
        _charts_section(rows, keys, steps) if rows else "",
        _failed_html(runs),
        _configs_html(rows, keys) if rows else "",
    ]
    if LAUNCH in keys:
        body.insert(3, '<p class="meta">Several launches: each row is one configuration of one launch.</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
