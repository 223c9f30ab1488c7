"""``xnorpp.report`` on synthetic multirun directories: grouping over seeds, statistics, failures, plot, CLI."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from xnorpp.report import (
    ERROR_LOG,
    RecordFailure,
    collect_runs,
    main,
    markdown_table,
    plot,
    render,
    summarise,
    varying_keys,
)
from xnorpp.track.wandb_file import read_records

CHOICES = {"model": "resnet18_preact", "binarization": "real_downsample", "scale": "rank1", "data": "mnist5k",
           "optimizer": "sgd", "scheduler": "cosine_restarts", "trainer": "default", "logger": "wandb",
           "hydra": "default", "experiment": None, "debug": None}  # fmt: skip


def _job(sweep: Path, num: int, overrides: list[str], top1: float | None = None, *, top5: float = 90.0,
         img_per_s: float = 100.0, epochs: int = 3, results: Any = "auto", log: str = "") -> Path:  # fmt: skip
    """A job directory as run.py and Hydra write it; ``top1=None`` and ``results="auto"``: no results.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    params = dict(o.lstrip("+").split("=", 1) for o in overrides)
    choices = {**CHOICES, **{k: v for k, v in params.items() if k in CHOICES}}
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"task_name": "sweep_binarization", "seed": int(params.get("seed", 0)),
              "optimizer": {"name": choices["optimizer"], "lr": float(params.get("optimizer.lr", 0.1))},
              "logger": {"wandb": {"project": "xnorpp", "entity": None, "group": None}}}  # fmt: skip
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if log:
        (job / "train.log").write_text(log)
    if results == "auto" and top1 is not None:
        history = [
            {"epoch": e, "val/top1": top1 * e / epochs, "val/top5": top5} for e in range(1, epochs + 1)
        ]
        results = {"val/top1": top1, "val/top5": top5, "best/val/top1": top1, "best/val/top5": top5,
                   "best/epoch": epochs, "epochs": epochs, "train/img_per_s": img_per_s, "history": history,
                   "choices": {k: v for k, v in choices.items() if v is not None}, "overrides": overrides}  # fmt: skip
    if isinstance(results, dict):
        (job / "results.json").write_text(json.dumps(results))
    elif isinstance(results, str) and results != "auto":
        (job / "results.json").write_text(results)
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """fp over seeds 0-2 (50, 52, 57), full_binary over one seed (40), and a failed job."""
    root = tmp_path / "multirun" / "sweep_binarization" / "2026-01-01_00-00-00"
    for i, (seed, top1) in enumerate([(0, 50.0), (1, 52.0), (2, 57.0)]):
        _job(root, i, ["binarization=fp", f"seed={seed}", "+sweep=binarization"], top1, top5=80.0 + seed,
             img_per_s=100.0 * (seed + 1))  # fmt: skip
    _job(root, 3, ["binarization=full_binary", "seed=0", "+sweep=binarization"], 40.0)
    _job(root, 4, ["binarization=weight_only", "seed=0", "+sweep=binarization"], log="line 1\nline 2\nboom\n")
    return root


def test_groups_runs_over_seeds_with_mean_and_sample_std(sweep: Path) -> None:
    runs = collect_runs([sweep])
    assert [r.path.name for r in runs] == ["0", "1", "2", "3", "4"]
    assert [r.ok for r in runs] == [True, True, True, True, False]
    rows = summarise(runs)
    assert [r.config["binarization"] for r in rows] == ["fp", "full_binary"]  # best mean first
    fp, fb = rows
    assert fp.n == 3 and fp.seeds == [0, 1, 2]
    assert fp.top1_mean == pytest.approx(53.0)
    assert fp.top1_std == pytest.approx(math.sqrt(((50 - 53) ** 2 + (52 - 53) ** 2 + (57 - 53) ** 2) / 2))
    assert fp.top5_mean == pytest.approx(81.0) and fp.img_per_s == pytest.approx(200.0) and fp.epochs == [3]
    assert fb.n == 1 and fb.top1_std is None and fb.top1_mean == 40.0
    assert varying_keys(rows) == ["binarization"]


def test_markdown_rows(sweep: Path) -> None:
    table = markdown_table(summarise(collect_runs([sweep])))
    lines = table.splitlines()
    assert lines[0].startswith(
        "| binarization | seeds | n | best top-1 mean | best top-1 std | best top-5 mean |"
    )
    assert lines[2] == "| fp | 0,1,2 | 3 | 53.00 | 3.61 | 81.00 | 3 | 200 |"
    assert lines[3] == "| full_binary | 0 | 1 | 40.00 | - | 90.00 | 3 | 100 |"
    assert len(lines) == 4


def test_seeds_from_several_multirun_dirs_form_one_configuration(tmp_path: Path) -> None:
    """Same configuration launched twice (other seeds, other launcher settings): one row of 3 seeds."""
    a, b = tmp_path / "a", tmp_path / "b"
    _job(a, 0, ["binarization=fp", "seed=0", "+sweep=binarization"], 50.0)
    _job(a, 1, ["binarization=fp", "seed=1", "+sweep=binarization"], 54.0)
    _job(b, 0, ["binarization=fp", "seed=2", "trainer.threads=4", "logger.wandb.mode=online"], 58.0)
    _job(b, 1, ["binarization=fp", "seed=3", "optimizer.lr=0.01"], 20.0)  # another configuration
    rows = summarise(collect_runs([a, b]))
    assert [(r.n, r.seeds) for r in rows] == [(3, [0, 1, 2]), (1, [3])]
    assert rows[0].top1_mean == pytest.approx(54.0)
    assert varying_keys(rows) == ["optimizer.lr"] and rows[0].config.get("optimizer.lr") is None
    by = summarise(collect_runs([a, b]), by=["optimizer.lr"])  # a dotted config key
    assert sorted((r.config["optimizer.lr"], r.n) for r in by) == [("0.01", 1), ("0.1", 3)]
    assert len(summarise(collect_runs([a, b]), ignore=["optimizer.lr"])) == 1


def test_failed_runs_are_listed_not_fatal(sweep: Path) -> None:
    _job(sweep, 5, ["binarization=fp", "seed=9"], results="{not json")
    _job(sweep, 6, ["binarization=fp", "seed=8"], results={"epochs": 0, "best/val/top1": -1.0})
    odd = _job(sweep, 7, ["binarization=fp", "seed=7"], 10.0)
    (odd / ".hydra" / "overrides.yaml").write_text("[unclosed")
    (odd / ".hydra" / "config.yaml").write_text("- a list, not a mapping\n")
    (odd / ".hydra" / "hydra.yaml").write_text("hydra: null\n")
    error = sweep / "4" / ERROR_LOG
    error.write_text(
        "Traceback (most recent call last):\n  File x\nValueError: data.image_size=2 is too small\n"
    )
    runs = collect_runs([sweep])
    rows = summarise(runs)
    assert sum(r.n for r in rows) == 4  # the failures are not averaged in
    text = render(rows, runs, "t", "report.png")
    assert "4 finished runs in 2 configurations, 4 failed" in text and "## Failed runs (4)" in text
    part = text.split("### ")[1:]
    assert "binarization=weight_only seed=0 +sweep=binarization" in part[0] and "no results.json" in part[0]
    assert "- error: `ValueError: data.image_size=2 is too small`" in part[0] and "boom" in part[0]
    assert "unreadable results.json" in part[1] and "has no val/top1" in part[2]
    assert "unreadable .hydra/overrides.yaml" in part[3]


def test_results_without_best_use_final_val(tmp_path: Path) -> None:
    _job(tmp_path, 0, ["seed=0"], results={"val/top1": 33.0, "val/top5": 70.0, "epochs": 0})
    (row,) = summarise(collect_runs([tmp_path]))
    assert row.top1_mean == 33.0 and row.top5_mean == 70.0 and row.img_per_s is None


def test_plot_writes_a_png(sweep: Path, tmp_path: Path) -> None:
    rows = summarise(collect_runs([sweep]))
    path = plot(rows, tmp_path / "sub" / "curves.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert plot([], tmp_path / "empty.png").stat().st_size > 0


def test_cli_writes_markdown_and_plot(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert md == capsys.readouterr().out
    assert "| fp | 0,1,2 | 3 | 53.00 | 3.61 |" in md and "![val top-1 per epoch](report.png)" in md
    assert (sweep / "report.png").stat().st_size > 5000
    other = tmp_path / "plots" / "x.png"
    assert main([str(sweep.parent), "--plot", str(other), "--by", "binarization", "scale"]) == 0
    assert other.is_file() and "| binarization | scale | seeds |" in (sweep.parent / "report.md").read_text()


def test_cli_without_jobs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path)])
    assert err.value.code == 2


def test_wandb_report_run_is_offline_in_the_sweep_group(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main([str(sweep), "--wandb"]) == 0
    (wandb_file,) = sweep.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 30  # wandb-core writes the file in the background, also after finish()
    while True:
        records = read_records(wandb_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            break
        assert time.time() < deadline, kinds
        time.sleep(0.1)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.job_type == "report" and run.run_group == f"sweep_binarization-{sweep.name}"
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert len(collect_runs([sweep])) == 5  # the report's own wandb files are not a job


def test_record_failure_callback_writes_the_traceback(tmp_path: Path) -> None:
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    try:
        raise ValueError("bad value")
    except ValueError as e:
        failed = JobReturn(status=JobStatus.FAILED, _return_value=e, overrides=["seed=0"])
    RecordFailure().on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=1.0))
    assert not (tmp_path / ERROR_LOG).exists()
    RecordFailure().on_job_end(config, failed)
    text = (tmp_path / ERROR_LOG).read_text()
    assert text.startswith("Traceback") and text.rstrip().endswith("ValueError: bad value")
