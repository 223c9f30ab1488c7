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
    Reference,
    collect_runs,
    compare_rows,
    markdown_table,
    pick_baselines,
    plot,
    render,
    summarise,
    varying_keys,
)
from xnorpp.report.cli import main
from xnorpp.track.wandb_file import read_records

CHOICES = {"model": "resnet18_preact", "binarization": "real_downsample", "scale": "rank1", "data": "mnist5k",
           "optimizer": "sgd", "scheduler": "cosine_restarts", "trainer": "default", "logger": "wandb",
           "hydra": "default", "experiment": None, "debug": None}  # fmt: skip


def _job(sweep: Path, num: int, overrides: list[str], top1: float | None = None, *, top5: float = 90.0,
         img_per_s: float = 100.0, epochs: int = 3, results: Any = "auto", log: str = "",
         config: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """A job directory as run.py and Hydra write it; ``top1=None`` and ``results="auto"``: no results.json.
    ``config`` adds top-level nodes to ``.hydra/config.yaml``."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    params = dict(o.lstrip("+").split("=", 1) for o in overrides)
    choices = {**CHOICES, **{k: v for k, v in params.items() if k in CHOICES}}
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"task_name": "sweep_binarization", "seed": int(params.get("seed", 0)),
              "optimizer": {"name": choices["optimizer"], "lr": float(params.get("optimizer.lr", 0.1))},
              "data": {"name": choices["data"]}, "trainer": {"epochs": epochs, "limit_train_batches": None},
              "logger": {"wandb": {"project": "xnorpp", "entity": None, "group": None}}, **(config or {})}  # fmt: skip
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
    half = 4.302653 * math.sqrt(13) / math.sqrt(3)  # t_{0.975, 2} s / sqrt(n), s^2 = 13
    assert fp.top1.ci == pytest.approx((53 - half, 53 + half), abs=1e-5)
    assert (fp.top1.min, fp.top1.max, fp.values) == (50.0, 57.0, [50.0, 52.0, 57.0])
    assert fp.top5_mean == pytest.approx(81.0) and fp.img_per_s == pytest.approx(200.0) and fp.epochs == [3]
    assert fb.n == 1 and fb.top1_std is None and fb.top1_mean == 40.0 and fb.top1.ci is None
    assert varying_keys(rows) == ["binarization"]


def test_markdown_rows(sweep: Path) -> None:
    table = markdown_table(summarise(collect_runs([sweep])))
    lines = table.splitlines()
    assert lines[0] == (
        "| binarization | seeds | n | best top-1 mean | std | 95% CI | min | max | best top-5 mean | epochs | img/s |"
    )
    assert lines[2] == "| fp | 0,1,2 | 3 | 53.00 | 3.61 | [44.04, 61.96] | 50.00 | 57.00 | 81.00 | 3 | 200 |"
    assert lines[3] == "| full_binary | 0 | 1 | 40.00 | - | - | 40.00 | 40.00 | 90.00 | 3 | 100 |"
    assert len(lines) == 4


def test_seeds_from_several_multirun_dirs_pool_with_ignore_launch(tmp_path: Path) -> None:
    """Same configuration launched twice (other seeds, other launcher settings): one launch each by
    default, one row of 3 seeds with ``ignore=["launch"]``."""
    a, b = tmp_path / "x" / "a", tmp_path / "y" / "b"
    _job(a, 0, ["binarization=fp", "seed=0", "+sweep=binarization"], 50.0)
    _job(a, 1, ["binarization=fp", "seed=1", "+sweep=binarization"], 54.0)
    _job(b, 0, ["binarization=fp", "seed=2", "trainer.threads=4", "logger.wandb.mode=online"], 58.0)
    _job(b, 1, ["binarization=fp", "seed=3", "optimizer.lr=0.01"], 20.0)  # another configuration
    runs = collect_runs([a, b])
    assert [r.launch for r in runs] == ["a", "a", "b", "b"]
    rows = summarise(runs)
    # a configuration's launches stay together, in PATH order; configurations by their best mean
    assert [(r.config["launch"], r.seeds) for r in rows] == [("a", [0, 1]), ("b", [2]), ("b", [3])]
    assert varying_keys(rows) == ["launch", "optimizer.lr"]
    pooled = summarise(runs, ignore=["launch"])
    assert [(r.n, r.seeds) for r in pooled] == [(3, [0, 1, 2]), (1, [3])]
    assert pooled[0].top1_mean == pytest.approx(54.0)
    assert varying_keys(pooled) == ["optimizer.lr"] and pooled[0].config.get("optimizer.lr") is None
    by = summarise(runs, by=["optimizer.lr"])  # a dotted config key
    assert sorted((r.config["optimizer.lr"], r.n) for r in by) == [("0.01", 1), ("0.1", 3)]
    assert len(summarise(runs, ignore=["optimizer.lr", "launch"])) == 1


def test_copies_of_a_jobs_config_inside_it_are_not_jobs(sweep: Path) -> None:
    """The trainer's wandb run keeps ``.hydra/*.yaml`` among its files: one job, not two."""
    copy = sweep / "0" / "wandb" / "offline-run-1" / "files" / ".hydra"
    copy.mkdir(parents=True)
    (copy / "overrides.yaml").write_text((sweep / "0" / ".hydra" / "overrides.yaml").read_text())
    assert [r.path.name for r in collect_runs([sweep])] == ["0", "1", "2", "3", "4"]
    assert [r.path.name for r in collect_runs([sweep / "0"])] == ["0"]


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


def test_a_failed_seed_is_left_out_of_the_statistics(tmp_path: Path) -> None:
    """Seeds 0 and 1 finished (90, 94), seed 2 failed: two seeds, t with 1 degree of freedom."""
    _job(tmp_path, 0, ["binarization=fp", "seed=0"], 90.0)
    _job(tmp_path, 1, ["binarization=fp", "seed=1"], 94.0)
    _job(tmp_path, 2, ["binarization=fp", "seed=2"], log="killed\n")
    runs = collect_runs([tmp_path])
    (row,) = summarise(runs)
    assert row.seeds == [0, 1] and row.top1.std == pytest.approx(math.sqrt(8))
    assert row.top1.ci == pytest.approx((92 - 2 * 12.706205, 92 + 2 * 12.706205), abs=1e-5)
    text = render([row], runs, "t")
    assert (
        "| 0,1 | 2 | 92.00 | 2.83 | [66.59, 117.41] | 90.00 | 94.00 |" in text
        and "## Failed runs (1)" in text
    )


@pytest.fixture
def paired(tmp_path: Path) -> Path:
    """fp 50, 52, 57 and full_binary 48, 51, 53 over seeds 0-2 (paired), real_downsample 60 on seed 0."""
    root = tmp_path / "paired"
    for i, (variant, seed, top1) in enumerate([("fp", 0, 50.0), ("fp", 1, 52.0), ("fp", 2, 57.0),
                                               ("full_binary", 0, 48.0), ("full_binary", 1, 51.0),
                                               ("full_binary", 2, 53.0), ("real_downsample", 0, 60.0)]):  # fmt: skip
        _job(root, i, [f"binarization={variant}", f"seed={seed}"], top1)
    return root


def test_cli_baseline_column_with_paired_and_unpaired_tests(
    paired: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([str(paired), "--baseline", "full_binary"]) == 0
    out = capsys.readouterr().out
    p = 1 - math.sqrt(7) / 3  # paired t = sqrt(7) with 2 degrees of freedom
    assert (
        f"| fp | 0,1,2 | 3 | 53.00 | 3.61 | [44.04, 61.96] | 50.00 | 57.00 | +2.33 | {p:.3f} (paired) |"
        in out
    )
    assert "| full_binary | 0,1,2 | 3 | 50.67 | 2.52 |" in out and "| baseline | - |" in out
    assert "| real_downsample | 0 | 1 | 60.00 | - | - | 60.00 | 60.00 | +9.33 | - (too few seeds (1 vs 3; 2 per side needed)) |" in out  # fmt: skip
    assert "mean of the baseline (binarization=full_binary)" in out and "(2 tests, not corrected" in out
    assert main([str(paired), "--baseline", "binarization=full_binary"]) == 0
    assert capsys.readouterr().out == out  # KEY=VALUE and a bare value name the same baseline


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["nope"], "no configuration has the value 'nope'"),
        (["colour=fp"], "no configuration key 'colour'; keys: binarization"),
        (["binarization=nope"], "no configuration has binarization=nope; values: fp, full_binary, real_downsample"),
    ],
)  # fmt: skip
def test_cli_bad_baseline_is_an_error_naming_the_fix(paired: Path, spec: list[str], message: str,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as err:
        main([str(paired), "--baseline", *spec])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_baseline_per_row_when_several_configurations_match(tmp_path: Path) -> None:
    """``scale=none`` over two binarizations: each row is compared with the none row of its binarization."""
    for i, (variant, scale, seed, top1) in enumerate(
        [(v, s, seed, base + (5 if s == "rank1" else 0) + seed) for v, base in (("fp", 90.0), ("full_binary", 70.0))
         for s in ("none", "rank1") for seed in (0, 1)]
    ):  # fmt: skip
        _job(tmp_path, i, [f"binarization={variant}", f"scale={scale}", f"seed={seed}"], top1)
    rows = summarise(collect_runs([tmp_path]))
    bases = pick_baselines(rows, ["scale=none"])
    pairs = {(r.config["binarization"], r.config["scale"]): (b.config["binarization"], b.config["scale"])
             for r, b in zip(rows, bases)}  # fmt: skip
    assert pairs == {("fp", "none"): ("fp", "none"), ("fp", "rank1"): ("fp", "none"),
                     ("full_binary", "none"): ("full_binary", "none"),
                     ("full_binary", "rank1"): ("full_binary", "none")}  # fmt: skip
    diffs = {
        (r.config["binarization"], r.config["scale"]): c for r, c in zip(rows, compare_rows(rows, bases))
    }
    assert diffs[("fp", "none")] is None  # the baseline itself
    assert diffs[("full_binary", "rank1")].diff == 5.0  # vs full_binary/none, not vs fp/none
    assert (
        diffs[("full_binary", "rank1")].note
        == "the same difference on every seed: no spread, t-test undefined"
    )
    (fp_none,) = [r for r in rows if (r.config["binarization"], r.config["scale"]) == ("fp", "none")]
    assert pick_baselines(rows, ["binarization=fp", "scale=none"]) == [fp_none] * 4  # one match: all rows


def test_cli_compares_launches_with_the_launch_as_a_column(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before, after = tmp_path / "runs" / "before", tmp_path / "runs" / "after"
    for i, (seed, top1) in enumerate([(0, 50.0), (1, 52.0), (2, 57.0)]):
        _job(before, i, ["binarization=fp", f"seed={seed}"], top1)
        _job(after, i, ["binarization=fp", f"seed={seed}"], top1 - 2 + seed)  # d = -2, -1, 0
        _job(before, 3 + i, ["binarization=full_binary", f"seed={seed}"], 40.0 + seed)
        _job(after, 3 + i, ["binarization=full_binary", f"seed={seed}"], 40.0 + seed)
    out_dir = tmp_path / "cmp"
    assert main([str(before), str(after), "--baseline", "launch=before", "--out", str(out_dir)]) == 0
    md = (out_dir / "report.md").read_text()
    assert md == capsys.readouterr().out and (out_dir / "report.png").is_file()
    assert not (before / "report.md").exists()  # --out: the launches' own directories stay as they were
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| launch | binarization | seeds | n |")
    p = 1 - math.sqrt(
        3 / 5
    )  # d = -2, -1, 0: t = -1 / (1 / sqrt(3)) = -sqrt(3), df = 2: 1 - |t| / sqrt(t^2 + 2)
    assert lines[1].startswith("| before | fp | 0,1,2 | 3 | 53.00 |") and "| baseline |" in lines[1]
    assert (
        lines[2].startswith("| after | fp | 0,1,2 | 3 | 52.00 |")
        and f"| -1.00 | {p:.3f} (paired) |" in lines[2]
    )
    assert lines[3].startswith("| before | full_binary |") and lines[4].startswith("| after | full_binary |")
    assert "| +0.00 | - (identical on every seed: no spread, t-test undefined) |" in lines[4]


def test_reference_gap_and_what_differs_from_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    reference = {"reference": {"top1": 57.6, "source": "original project README", "data": "imagenet",
                               "epochs": 63}}  # fmt: skip
    for seed, top1 in enumerate([90.0, 94.0]):
        _job(tmp_path, seed, ["experiment=seed_resnet18_imagenet", "data=mnist5k", f"seed={seed}"], top1,
             config=reference)  # fmt: skip
    _job(tmp_path, 2, ["binarization=fp", "seed=0"], 97.0)  # no preset: no reference
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| paper top-1 | gap | vs recipe |" in out
    assert "| 57.6 | +34.40* | data mnist5k, not imagenet; 3 of 63 epochs |" in out
    assert "| 97.00 | - | - | 97.00 | 97.00 | - | - | - |" in out
    assert "- 57.6: original project README" in out and "so the gap is no reproduction result" in out
    (row,) = [r for r in summarise(collect_runs([tmp_path])) if r.reference]
    assert row.gap == pytest.approx(92.0 - 57.6)
    on_recipe = Reference(top1=57.6, source="s", data="mnist5k", epochs=3)
    assert row.runs[0].deviations(on_recipe) == []


def test_malformed_reference_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = _job(tmp_path, 0, ["seed=0"], 90.0, config={"reference": {"top1": "57.6%", "source": "x"}})
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path)])
    text = capsys.readouterr().err
    assert err.value.code == 2 and str(job / ".hydra" / "config.yaml") in text and "numeric top1" in text


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
    assert "| fp | 0,1,2 | 3 | 53.00 | 3.61 | [44.04, 61.96] | 50.00 | 57.00 |" in md
    assert (
        "![val top-1 per epoch](report.png)" in md and "95% confidence interval of the mean (Student t)" in md
    )
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
    assert run.job_type == "report" and run.run_group == "sweep_binarization/report"
    assert f"launch:{sweep.name}" in run.tags
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
