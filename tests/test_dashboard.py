"""``python -m xnorpp.report ... --html`` on real sweeps made by train.py, opened in headless Chromium.

Two launches: ``before`` (fp and full_binary over seeds 0 and 1, 2 epochs, wandb offline, health every
step) and ``after`` (fp seed 0 without wandb, and full_binary failing: data.image_size=2 is too small for
the rank-1 scale), the latter as two multiruns in one folder. The page must load from a file without
console errors or network requests, draw its charts, and show the numbers of the run directories.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from browser import Browser, find_chromium
from conftest import ROOT, TINY

from xnorpp.report.html import Series, line_chart
from xnorpp.track.wandb_file import history_rows, read_records, run_files

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (apt-get install chromium, or set XNORPP_CHROMIUM to its path)"
)
# the tiny smoke-run settings, 2 epochs, no checkpoints; epochs and image size set per launch
BASE = [o for o in TINY if not o.startswith(("logger", "trainer.epochs", "data.image_size"))]
BASE += ["trainer.checkpoint.save=false", "trainer.epochs=2"]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("launches")
    before, after = root / "before", root / "after"
    out = _run(
        "train.py",
        "+sweep=binarization",
        "binarization=fp,full_binary",
        "seed=0,1",
        *BASE,
        "data.image_size=16",
        "trainer.health_every=1",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "logger.wandb.log_model_summary=false",
        f"hydra.sweep.dir={before}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run(
        "train.py",
        "+sweep=binarization",
        "binarization=fp",
        "seed=0",
        *BASE,
        "data.image_size=16",
        "logger=none",
        f"hydra.sweep.dir={after / 'ok'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = _run(
        "train.py",
        "+sweep=binarization",
        "binarization=full_binary",
        "seed=0",
        *BASE,
        "data.image_size=2",
        "logger=none",
        f"hydra.sweep.dir={after / 'broken'}",
    )
    assert out.returncode == 1 and "too small for scale=rank1" in out.stderr, out.stderr[-3000:]
    return before, after


def _best(job: Path) -> float:
    return float(json.loads((job / "results.json").read_text())["best/val/top1"])


def test_the_wandb_reader_reads_the_trainers_run_files(launches: tuple[Path, Path]) -> None:
    before, _ = launches
    for job in sorted(p for p in before.iterdir() if p.is_dir()):
        (path,) = run_files(job)
        deadline = time.monotonic() + 60  # wandb's service may finish the file just after train.py exits
        while "exit" not in [r.WhichOneof("record_type") for r in read_records(path)]:
            assert time.monotonic() < deadline, f"{path} has no exit record"
            time.sleep(0.2)
        rows = history_rows(path)
        lr = [r["train/lr"] for r in rows if "train/lr" in r]
        assert len(lr) == 2 * 2 and all(0 <= v <= 0.1 for v in lr)  # 2 epochs of 2 steps, every step logged
        val = [r["val/top1"] for r in rows if "val/top1" in r]
        history = json.loads((job / "results.json").read_text())["history"]
        assert val == [h["val/top1"] for h in history]
        binary = json.loads((job / "results.json").read_text())["model_args"]["binarization"] != "fp"
        assert any("health/flip" in r for r in rows) == binary  # fp has no binary layers to measure


PAGE_DATA = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
  return {
    charts: [...document.querySelectorAll('svg.chart')].map(s => ({
      title: s.getAttribute('aria-label'), box: box(s),
      lines: [...s.querySelectorAll('polyline.series')].map(box),
      bands: s.querySelectorAll('polygon.band').length})),
    head: [...document.querySelectorAll('table.summary th')].map(t => t.textContent),
    rows: [...document.querySelectorAll('table.summary tbody tr')]
      .map(r => [...r.cells].map(c => c.textContent)),
    missing: [...document.querySelectorAll('p.na')].map(p => p.textContent),
    text: document.body.innerText,
  };
})()"""


@needs_chromium
def test_html_report_in_chromium(launches: tuple[Path, Path], tmp_path: Path) -> None:
    before, after = launches
    page = tmp_path / "report.html"
    out = _run(
        "-m",
        "xnorpp.report",
        str(before),
        str(after),
        "--baseline",
        "fp",
        "--html",
        str(page),
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert CHROMIUM is not None
    with Browser(CHROMIUM) as browser:
        browser.open(page.as_uri(), 1200, 900)
        data: dict[str, Any] = browser.evaluate(PAGE_DATA)
        assert browser.errors() == []
        assert browser.requests() == [page.as_uri()]  # self-contained: nothing else is fetched
        shot = browser.screenshot(tmp_path / "shot.png", 1200, 900)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # the table: one row per configuration and launch, numbers as in the run directories' results.json
    head, rows = data["head"], {(r[0], r[1]): dict(zip(data["head"], r)) for r in data["rows"]}
    assert head[:4] == ["launch", "binarization", "seeds", "n"] and "Δ vs baseline" in head
    assert set(rows) == {("before", "fp"), ("before", "full_binary"), ("after", "fp")}
    jobs = {"fp": [before / "0", before / "1"], "full_binary": [before / "2", before / "3"]}
    for variant, dirs in jobs.items():
        values = [_best(d) for d in dirs]
        row = rows[("before", variant)]
        assert (row["seeds"], row["n"]) == ("0,1", "2")
        assert row["best top-1 mean"] == f"{statistics.fmean(values):.2f}"
        assert (row["min"], row["max"]) == (f"{min(values):.2f}", f"{max(values):.2f}")
    fp_mean = statistics.fmean(_best(d) for d in jobs["fp"])
    fb_mean = statistics.fmean(_best(d) for d in jobs["full_binary"])
    assert rows[("before", "fp")]["Δ vs baseline"] == "baseline"
    assert rows[("before", "full_binary")]["Δ vs baseline"] == f"{fb_mean - fp_mean:+.2f}"
    assert (
        rows[("before", "full_binary")]["p (test)"].endswith("(paired)")
        or "every seed" in (rows[("before", "full_binary")]["p (test)"])
    )  # seeds 0 and 1 on both sides
    assert rows[("after", "fp")]["best top-1 mean"] == f"{_best(after / 'ok' / '0'):.2f}"
    assert rows[("after", "fp")]["std"] == "-" and rows[("after", "fp")]["95% CI"] == "-"

    # the charts render: every SVG and every line has a size on the page
    titles = [c["title"] for c in data["charts"]]
    assert titles[:3] == [
        "val top-1: mean over seeds, band min-max",
        "learning rate per optimizer step (one seed per configuration)",
        "training images/s per epoch (per job): mean over seeds, band min-max",
    ]
    assert {"flip", "frozen", "act_in_window", "scale_mean", "scale_std"} <= set(titles)
    for chart in data["charts"]:
        assert chart["box"][0] > 100 and chart["box"][1] > 100, chart
        assert chart["lines"] and all(w > 0 for w, _ in chart["lines"]), chart
    val = data["charts"][0]
    assert len(val["lines"]) == 3 and val["bands"] <= 2  # a band only where 2 seeds differ
    assert data["missing"] == []  # lr and health are recorded by the wandb runs of "before"

    # failed run with its error; commands and config differences
    text = data["text"]
    assert "Failed runs (1)" in text and "too small for scale=rank1" in text
    assert f"hydra.sweep.dir={before}" in text and "python train.py binarization=fp seed=0" in text
    assert "Settings that differ between the configurations" in text and "binarization.name" in text


def test_html_says_what_a_launch_did_not_record(launches: tuple[Path, Path], tmp_path: Path) -> None:
    """The ``after`` launch ran without wandb: its page has val and throughput but no lr or health."""
    _, after = launches
    page = tmp_path / "after.html"
    out = _run("-m", "xnorpp.report", str(after), "--html", str(page), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    text = page.read_text()
    assert text.count('class="na"') == 2
    assert "Not recorded: no run has per-step <code>train/lr</code>" in text
    assert "Not recorded: no run has <code>health/&lt;metric&gt;</code>" in text
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize(
    ("ys", "labels"),
    [
        ([0.0, 0.1], ["0.00", "0.02", "0.04", "0.06", "0.08", "0.10"]),
        ([0.999, 1.001], ["0.9990", "0.9995", "1.0000", "1.0005", "1.0010"]),
        ([50.0, 98.0], ["50", "60", "70", "80", "90", "100"]),
    ],
)
def test_chart_ticks_are_round_and_tell_values_apart(ys: list[float], labels: list[str]) -> None:
    """y labels get as many decimals as their step needs; x (epochs, steps) gets whole numbers."""
    svg = line_chart(
        [Series("a", "#000", [1.0, 2.0, 3.0], [ys[0], ys[1], ys[1]])], title="t", xlabel="x", ylabel="y"
    )
    ticks = re.findall(
        r'<text class="tick" x="([\d.]+)" y="[\d.]+" text-anchor="(end|middle)">([^<]*)</text>', svg
    )
    assert [t for _, anchor, t in ticks if anchor == "end"] == labels
    assert [t for _, anchor, t in ticks if anchor == "middle"] == ["1", "2", "3"]
    assert svg.count('<polyline class="series"') == 1 and svg.count("<circle") == 3
