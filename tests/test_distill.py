"""Distillation from a real-valued teacher: the losses, the teacher, and a KD run from an fp run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from xnorpp.engine.distill import Distiller, distribution_loss, kd_loss, load_teacher
from xnorpp.run import train

S = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
T = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, -2.0]])
Y = torch.tensor([0, 2])


def test_kd_loss_is_the_weighted_sum_of_cross_entropy_and_tempered_kl() -> None:
    for temp, weight in ((1.0, 0.5), (4.0, 0.9), (2.0, 0.0)):
        p, log_q = F.softmax(T / temp, 1), F.log_softmax(S / temp, 1)
        kl = (p * (p.log() - log_q)).sum(1).mean()
        want = (1 - weight) * F.cross_entropy(S, Y) + weight * temp**2 * kl
        assert kd_loss(S, T, Y, temp, weight).item() == pytest.approx(want.item(), rel=1e-6)
    assert kd_loss(S, S, Y, 3.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distribution_loss_is_kl_from_the_teacher_and_ignores_labels() -> None:
    p = F.softmax(T, 1)
    soft_ce = -(p * F.log_softmax(S, 1)).sum(1).mean()
    entropy = -(p * p.log()).sum(1).mean()
    assert distribution_loss(S, T).item() == pytest.approx((soft_ce - entropy).item(), rel=1e-6)
    s = S.clone().requires_grad_()
    distribution_loss(s, T).backward()  # the soft cross-entropy's gradient: softmax(s) - softmax(t)
    assert torch.allclose(s.grad, (F.softmax(S, 1) - p) / 2, atol=1e-6)


def test_teacher_runs_in_eval_mode_without_gradients() -> None:
    teacher = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller("kd", teacher)
    student = nn.Linear(3, 3)
    x = torch.randn(8, 3)
    student.train()
    loss = distiller(student(x), torch.zeros(8, dtype=torch.long), x)
    loss.backward()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # BN stats untouched
    assert student.weight.grad is not None
    with pytest.raises(ValueError, match="weight must be in"):
        Distiller("kd", teacher, weight=1.5)


def test_timm_teacher_with_local_weights_and_clear_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "teacher.pth")
    teacher = load_teacher("test_resnet", 10, 3, weights_file=str(tmp_path / "teacher.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x)) and not teacher.training
    with pytest.raises(ValueError, match="neither a checkpoint file nor a timm model"):
        load_teacher("no_such_model_v9", 10, 3)
    # a checkpoint of this framework for 10 classes as the teacher of 5-class data
    args = {"name": "resnet18_preact_bin", "binarization": "fp", "scale": "rank1", "num_classes": 10,
            "in_chans": 3, "input_size": 16, "stem": "small", "estimator": "ste"}  # fmt: skip
    fp = timm.create_model("resnet18_preact_bin", **{k: v for k, v in args.items() if k != "name"})
    torch.save({"model": fp.state_dict(), "model_args": args}, tmp_path / "fp.pt")
    with pytest.raises(ValueError, match="predicts 10 classes but the data has 5"):
        load_teacher(str(tmp_path / "fp.pt"), 5, 3)


def test_kd_from_an_fp_run_of_this_framework_trains(make_cfg, tmp_path: Path) -> None:
    fp = train(make_cfg("binarization=fp", out=tmp_path / "fp"))
    ckpt = tmp_path / "fp" / "checkpoints" / "last.pt"
    results = train(
        make_cfg("binarization=full_binary", "distill=kd", f"distill.teacher={ckpt}", out=tmp_path / "kd")
    )
    assert results["global_step"] == 2 and results["train/loss"] > 0
    record = results["distill"]  # (distribution: the reactnet preset's smoke run)
    assert (record["name"], record["teacher"], record["temperature"]) == ("kd", str(ckpt), 4.0)
    assert record["teacher_val_top1"] == pytest.approx(fp["val/top1"])  # the fp run, on the same images
    with pytest.raises(Exception, match="teacher"):
        train(make_cfg("distill=kd", out=tmp_path / "no_teacher"))  # distill.teacher is required


def test_kd_hard_term_is_the_runs_loss() -> None:
    """``distill=kd`` keeps the configured ``loss`` (label smoothing here) as its hard term."""
    teacher = nn.Linear(3, 3)
    smooth = nn.CrossEntropyLoss(label_smoothing=0.2)
    d = Distiller("kd", teacher, temperature=2.0, weight=0.25, hard_loss=smooth)
    x = torch.randn(2, 3)
    with torch.no_grad():
        t = teacher(x)
    soft = F.kl_div(F.log_softmax(S / 2, 1), F.log_softmax(t / 2, 1), reduction="batchmean", log_target=True)
    assert float(d(S, Y, x)) == pytest.approx(float(0.75 * smooth(S, Y) + 0.25 * 4 * soft), rel=1e-6)
    assert float(smooth(S, Y)) != pytest.approx(float(F.cross_entropy(S, Y)))  # the smoothing shows
