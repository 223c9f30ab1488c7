"""Tabulate sweeps offline: ``python -m xnorpp.report PATH [PATH ...] [--baseline CONFIG] [--html FILE]``.

Reads every job directory under the PATHs (a directory with ``.hydra/overrides.yaml``: a multirun
directory, a folder of several, or single runs), groups the runs by configuration (their group choices
and command-line values, minus ``seed`` and settings that do not change results; with several PATHs
also the launch, i.e. the PATH a run was found under) and writes

- a markdown table, one row per configuration, of the best val top-1 over seeds: mean, sample standard
  deviation, 95% confidence interval of the mean (Student t), min and max, plus the mean best val
  top-5, seeds, epochs and training images/s (``OUT/report.md``, also printed; OUT is the first PATH
  unless ``--out`` says otherwise); :mod:`xnorpp.stats` has the formulas;
- with ``--baseline CONFIG`` (e.g. ``binarization=fp``): the difference of each mean to the baseline's
  and a two-sided t-test over seeds (paired by seed where both ran the same seeds, else Welch's);
- where the runs come from an ``experiment=`` preset: the number it reproduces (its ``reference`` node),
  the gap to it, and what differs from the recipe behind that number (epochs, data);
- a plot of val top-1 per epoch, mean over seeds with the min-max band (``OUT/report.png``);
- a "failed runs" section for jobs without a usable ``results.json``, with their overrides, the error a
  sweep preset's :class:`RecordFailure` callback saved, and the end of their log;
- with ``--html FILE``: one self-contained HTML page with all of it plus the learning rate, throughput
  and health curves, commands and config differences (:mod:`xnorpp.report.html`).

``--by binarization scale`` groups by those keys only (a group choice, a command-line key, ``launch``
or any dotted config key such as ``optimizer.lr``); ``--ignore launch`` pools the PATHs' runs. ``--wandb``
also logs the table and the plot as a wandb run with job_type ``report`` in the sweep's group (offline
unless ``WANDB_MODE`` says otherwise). Accuracy is in percent.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .html import write_html
from .table import collect_runs, log_to_wandb, pick_baselines, plot, render, summarise, varying_keys

__all__ = ["main"]

log = logging.getLogger("xnorpp.report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xnorpp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="multirun directories (or folders of them); several: one launch each",
    )
    parser.add_argument("--by", nargs="+", action="extend", metavar="KEY", help="group by these keys only")
    parser.add_argument(
        "--ignore",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY",
        help="also ignore these keys when grouping (e.g. data.image_size; launch pools the PATHs)",
    )
    parser.add_argument(
        "--baseline",
        nargs="+",
        action="extend",
        metavar="CONFIG",
        help="compare every configuration with this one: KEY=VALUE items or a bare value (fp); "
        "after the PATHs",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="where report.md and report.png go (default: first PATH)"
    )
    parser.add_argument("--plot", type=Path, metavar="FILE", help="PNG to write (default: OUT/report.png)")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained HTML report")
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
    out_dir = args.out or args.paths[0]
    try:
        rows = summarise(runs, args.by, args.ignore)
        baselines = pick_baselines(rows, args.baseline) if args.baseline and rows else None
    except ValueError as e:
        parser.error(str(e))
    keys = list(args.by) if args.by else varying_keys(rows)
    title = ", ".join(map(str, args.paths))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = plot(rows, args.plot or out_dir / "report.png", keys, title=", ".join(p.name for p in args.paths))
    try:
        link = os.path.relpath(image, out_dir)
    except ValueError:  # another drive (Windows)
        link = str(image)
    text = render(rows, runs, f"Report: {title}", link, keys, baselines)
    (out_dir / "report.md").write_text(text)
    print(text, end="")
    log.info("wrote %s and %s", out_dir / "report.md", image)
    if args.html:
        log.info("wrote %s", write_html(args.html, rows, runs, keys, baselines, title=f"Report: {title}"))
    if args.wandb:
        run_dir = log_to_wandb(rows, runs, keys, image, out_dir)
        if run_dir:
            log.info("wandb report run: %s", run_dir)
    return 0
