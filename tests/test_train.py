"""End-to-end runs through ``xnorpp.run.train`` with the real configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, compose_cfg

from xnorpp.engine.memory import jemalloc_loaded
from xnorpp.run import train

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_default_trains_a_short_epoch_on_bundled_data(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "default"
    cfg = make_cfg("trainer.epochs=1", "trainer.limit_train_batches=6", tiny=False, out=out)
    assert cfg.logger.wandb.mode == "offline"
    results = train(cfg)
    saved = json.loads((out / "results.json").read_text())
    for key in [
        "val/top1",
        "val/top5",
        "best/val/top1",
        "epochs",
        "train/img_per_s",
        "params/binary",
        "params/real",
    ]:
        assert saved[key] is not None, key
    assert saved["epochs"] == 1 and saved["params/binary"] == 10_985_472
    assert saved["kernels"] == "compiled"  # the default compiles the sign kernel (a C++ compiler is here)
    assert saved["int8_conv"] is True  # fp32 on CPU: the binary forward convs ran as exact int8 convs
    assert saved["c_kernels"] is True  # and their element-wise work in the C kernels (a C compiler is here)
    want = ("jemalloc", "jemalloc") if jemalloc_loaded() else ("keep", "glibc")  # auto, in this process
    assert (saved["malloc"], saved["allocator"]) == want
    assert 0.0 <= saved["val/top1"] <= 100.0 and saved["val/top5"] >= saved["val/top1"]
    assert results["best/val/top1"] == saved["best/val/top1"]
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), _files(out)
    assert saved["wandb_mode"] == "offline" and saved["wandb_dir"] == str(runs[0])


def test_logger_none_writes_no_wandb_files(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "nowandb"
    train(make_cfg(out=out))
    assert (out / "results.json").is_file()
    assert not any("wandb" in f for f in _files(out)), _files(out)


@pytest.fixture(scope="module")
def fp_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-valued run on the smoke runs' data, the teacher of presets that distill."""
    out = tmp_path_factory.mktemp("teacher")
    train(compose_cfg([*TINY, "binarization=fp"], out))
    return out / "checkpoints" / "last.pt"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_smoke_trains(
    make_cfg, experiment: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / experiment
    cfg = make_cfg(f"experiment={experiment}", out=out)
    if cfg.distill.name != "none":  # the preset's ImageNet teacher cannot grade synthetic classes
        cfg = make_cfg(
            f"experiment={experiment}", f"distill.teacher={request.getfixturevalue('fp_teacher')}", out=out
        )
    assert cfg.data.name == "synthetic" and cfg.trainer.limit_train_batches == 2
    results = train(cfg)
    stages = len(cfg.stages or {}) or 1  # each stage: one epoch of two steps
    assert results["epochs"] == stages and results["global_step"] == 2 * stages
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("binarization", ["fp", "weight_only", "full_binary", "real_downsample"])
def test_every_binarization_trains(make_cfg, binarization: str) -> None:
    results = train(make_cfg(f"binarization={binarization}"))
    assert results["model_args"]["binarization"] == binarization
    expected_binary = {
        "fp": 0,
        "weight_only": 10_985_472,
        "full_binary": 11_157_504,
        "real_downsample": 10_985_472,
    }
    assert results["params/binary"] == expected_binary[binarization]


@pytest.mark.parametrize("scale", ["none", "xnor", "xnor_k", "channel", "full", "channel_spatial", "rank1"])
def test_every_scale_trains(make_cfg, scale: str) -> None:
    results = train(make_cfg(f"scale={scale}", "binarization=full_binary"))
    assert results["model_args"]["scale"] == scale
    assert results["train/loss"] > 0


@pytest.mark.parametrize("opt", ["optimizer=adam", "optimizer=adamw", "scheduler=step", "scheduler=multistep",
                                 "scheduler=cosine", "scheduler.warmup_epochs=1", "model=resnet34_preact",
                                 "model=timm_resnet18", "model.estimator=approx_sign", "trainer.channels_last=true"])  # fmt: skip
def test_other_choices_train(make_cfg, opt: str) -> None:
    extra = ["binarization=fp"] if opt == "model=timm_resnet18" else []
    results = train(make_cfg(opt, *extra))
    assert results["global_step"] == 2


@pytest.mark.slow  # in `pytest -m slow`: keeps the default run under 10 minutes
def test_overfit_debug_preset_fits_one_batch(make_cfg) -> None:
    results = train(make_cfg("debug=overfit", "binarization=fp", "trainer.epochs=25", "optimizer=adam"))
    assert results["train/loss"] < 0.5, results["history"][-1]


def test_evaluate_a_checkpoint(make_cfg, tmp_path: Path) -> None:
    first = train(make_cfg(out=tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    results = train(make_cfg("train=false", f"ckpt_path={ckpt}", out=tmp_path / "b"))
    assert results["epochs"] == 0
    assert results["val/top1"] == pytest.approx(first["val/top1"])
    assert (tmp_path / "b" / "results.json").is_file()


def test_missing_dataset_root_names_the_path(make_cfg, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        train(
            make_cfg(
                "data=imagefolder", f"data.root={missing}", "data.image_size=32", "logger=none", tiny=False
            )
        )
    assert str(missing) in str(err.value)
    assert "train" in str(err.value) and "val" in str(err.value)  # the expected layout


def test_image_size_too_small_for_a_spatial_scale_fails_before_training(make_cfg) -> None:
    with pytest.raises(ValueError, match="image_size=4 is too small for scale=rank1"):
        train(make_cfg("data.image_size=4"))


def test_bad_scale_name_lists_valid_choices(make_cfg) -> None:
    with pytest.raises(
        ValueError, match="valid choices: none, xnor, xnor_k, channel, full, channel_spatial, rank1"
    ):
        train(make_cfg("scale.name=rank2"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.kernels=fast", "trainer.kernels: .*valid choices: eager, compiled"),
     ("trainer.malloc=tcmalloc", "trainer.malloc: .*valid choices: auto, keep, system, jemalloc"),
     ("trainer.malloc=jemalloc", "trainer.malloc: .*needs jemalloc loaded when the process starts"),
     ("trainer.int8_conv=maybe", "trainer.int8_conv must be true or false, got 'maybe'")],
)  # fmt: skip
def test_bad_speed_setting_names_the_key_and_the_choices(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(make_cfg(override))


def test_weight_decay_groups_reach_the_optimizer(make_cfg) -> None:
    from xnorpp.engine import build_optimizer
    from xnorpp.run import build_model, model_args_from_cfg

    cfg = make_cfg()
    model = build_model(model_args_from_cfg(cfg, 10, 3))
    opt = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-5)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["real"]["weight_decay"] == 1e-5 and groups["binary"]["weight_decay"] == 0.0
    n_binary = sum(p.numel() for p in groups["binary"]["params"])
    n_scales = sum(p.numel() for n, p in model.named_parameters() if "scale_factor" in n)
    assert n_binary == 10_985_472 + n_scales
    assert torch.is_tensor(groups["real"]["params"][0])


def test_each_job_of_a_multirun_starts_from_its_own_switches(make_cfg, tmp_path: Path) -> None:
    """Jobs of a sequential multirun share a process: process-wide switches follow each job's config."""
    from xnorpp.job import DEFAULT_THREADS as _DEFAULT_THREADS
    from xnorpp.nn import kernels

    odd = train(make_cfg("trainer.int8_conv=false", "trainer.deterministic=true", "trainer.threads=3",
                         "trainer.kernels=eager", out=tmp_path / "a"))  # fmt: skip
    assert (odd["int8_conv"], odd["kernels"], odd["threads"]) == (False, "eager", 3)
    assert torch.are_deterministic_algorithms_enabled()
    kernels._failed = "RuntimeError: as if this job's compile had failed"
    plain = train(make_cfg("trainer.kernels=compiled", "trainer.threads=null", out=tmp_path / "b"))
    assert (plain["int8_conv"], plain["kernels"], plain["threads"]) == (True, "compiled", _DEFAULT_THREADS)
    assert not torch.are_deterministic_algorithms_enabled()


def test_threads_follow_the_slurm_allocation(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert train(make_cfg("trainer.threads=null"))["threads"] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's two processes in one SLURM task
    assert train(make_cfg("trainer.threads=null"))["threads"] == 1


@pytest.mark.parametrize(("extra", "lr"), [([], 0.1 * 8 / 256), (["optimizer=adam"], 1e-3 * (8 / 256) ** 0.5),
                                           (["optimizer.lr_base_size=null"], 0.1), (["optimizer.lr_base_size=8"], 0.1)])  # fmt: skip
def test_learning_rates_are_given_for_a_batch_of_256_and_scaled_to_the_run(
    make_cfg, extra: list[str], lr: float
) -> None:
    """SGD scales linearly with the global batch, adaptive optimizers by its square root (TINY: batch 8)."""
    results = train(make_cfg(*extra))
    assert results["lr"] == pytest.approx(lr) and results["lr_scale"] == pytest.approx(
        lr / (1e-3 if extra[:1] == ["optimizer=adam"] else 0.1)
    )


def test_lr_factor_rules() -> None:
    from xnorpp.engine import lr_factor

    assert lr_factor(64, 256) == 0.25 and lr_factor(1024, 256, "sqrt") == 2.0 and lr_factor(64, None) == 1.0
    assert lr_factor(64, 256, "none") == 1.0
    with pytest.raises(ValueError, match="valid choices: linear, sqrt, none"):
        lr_factor(64, 256, "cubic")
