"""Binarization health metrics: values against hand counts, and their delivery from the training loop."""

from __future__ import annotations

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import xnorpp  # noqa: F401
from xnorpp.engine import StepState, build_optimizer, build_scheduler, train_one_epoch
from xnorpp.engine.health import BinarizationHealth
from xnorpp.nn import BinaryConv2d


def _model(binarization: str = "full_binary", scale: str = "rank1") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "resnet18_preact_bin", binarization=binarization, scale=scale, num_classes=4, in_chans=3, input_size=8,
        stem="small",
    )  # fmt: skip


def test_flip_frozen_and_scale_match_hand_counts() -> None:
    model = _model()
    health = BinarizationHealth(model, every=1)
    conv: BinaryConv2d = model.layer1[0].conv1
    with torch.no_grad():
        before = conv.scaled_weight_source() >= 0
        conv.weight.mul_(-1.0)  # centring is linear: every nonzero centred sign flips
        conv.weight[0, 0, 0, 0] += 50.0  # one far-out latent weight: frozen
        conv.scale_factor.alpha.fill_(2.0)
    metrics = health.compute()
    c = conv.scaled_weight_source().detach()
    assert metrics["health_layer/layer1.0.conv1/flip"] == float(((c >= 0) != before).float().mean())
    assert metrics["health_layer/layer1.0.conv1/flip"] > 0.9
    assert metrics["health_layer/layer1.0.conv1/frozen"] == float((c.abs() > 1).float().mean()) > 0
    assert (
        metrics["health_layer/layer1.0.conv1/scale_mean"] == 2.0
        and metrics["health_layer/layer1.0.conv1/scale_std"] == 0.0
    )
    again = health.compute()  # nothing changed since: no flips
    assert again["health_layer/layer1.0.conv1/flip"] == 0.0
    n_layers = len([1 for k in metrics if k.startswith("health_layer/") and k.endswith("/flip")])
    assert n_layers == 19  # 16 block convs + 3 binary downsample convs
    assert (
        abs(
            metrics["health/flip"]
            - sum(v for k, v in metrics.items() if k.startswith("health_layer/") and k.endswith("/flip")) / 19
        )
        < 1e-9
    )


def test_activation_window_fraction_is_captured_only_when_asked() -> None:
    model = _model().eval()
    health = BinarizationHealth(model, every=1)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert "health_layer/layer1.0.conv1/act_in_window" not in health.compute()
    inputs = {}
    model.layer1[0].conv1.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
    health.capture = True
    model(x)
    metrics = health.compute()
    assert metrics["health_layer/layer1.0.conv1/act_in_window"] == float(
        (inputs["x"].abs() <= 1).float().mean()
    )
    health.close()


def test_weight_only_layers_report_no_activation_window_and_xnor_reports_alpha() -> None:
    model = _model("weight_only", "xnor")
    metrics = BinarizationHealth(model, every=1).compute()
    assert not any(k.endswith("act_in_window") for k in metrics)
    conv = model.layer1[0].conv1
    alpha = conv.scaled_weight_source().detach().abs().mean(dim=(1, 2, 3))
    assert metrics["health_layer/layer1.0.conv1/scale_mean"] == float(alpha.mean())


def test_training_loop_logs_health_every_n_steps() -> None:
    model = _model()
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    loader = DataLoader(data, batch_size=4)
    opt = build_optimizer(model, "sgd", lr=0.5)
    sched = build_scheduler(opt, "constant", epochs=1, updates_per_epoch=len(loader))
    logged: list[dict] = []
    health = BinarizationHealth(model, every=3)
    train_one_epoch(
        model, loader, opt, sched, StepState(), device=torch.device("cpu"), epochs=1, log_every=100,
        log_fn=logged.append, progress=False, health=health,
    )  # fmt: skip
    health_steps = [m["global_step"] for m in logged if "health/flip" in m]
    assert health_steps == [3, 6]
    first = next(m for m in logged if m["global_step"] == 3)
    assert 0.0 <= first["health/act_in_window"] <= 1.0 and first["health/flip"] > 0.0
