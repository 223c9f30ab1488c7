"""Bop: a binary weight flips when its gradient's moving average agrees with it and passes the threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xnorpp.engine import build_optimizer
from xnorpp.engine.bop import Bop
from xnorpp.export import export_model, load_export
from xnorpp.nn import BinaryConv2d
from xnorpp.run import train


def _bop(w: list[float], gamma: float, threshold: float) -> tuple[nn.Parameter, Bop]:
    p = nn.Parameter(torch.tensor(w))
    return p, Bop([{"params": [p], "bop": True}], gamma=gamma, threshold=threshold)


def _step(p: nn.Parameter, opt: Bop, grad: list[float]) -> None:
    p.grad = torch.tensor(grad)
    opt.step()


def test_bop_flips_exactly_where_the_momentum_agrees_with_the_weight_past_the_threshold() -> None:
    p, opt = _bop([1.0, 1.0, -1.0, -1.0, 1.0], gamma=0.5, threshold=0.3)
    # m = 0.5 g: [0.5, 0.2, -0.5, 0.5, -0.5]; w * m = [0.5, 0.2, 0.5, -0.5, -0.5] > 0.3 flips 0 and 2
    _step(p, opt, [1.0, 0.4, -1.0, 1.0, -1.0])
    assert torch.equal(opt.state[p]["momentum"], torch.tensor([0.5, 0.2, -0.5, 0.5, -0.5]))
    assert torch.equal(p.detach(), torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0]))
    # m = 0.5 m + 0.5 g: [0.25, 0.5, -0.25, 0.25, -0.25]; w * m = [-0.25, 0.5, -0.25, -0.25, -0.25]
    _step(p, opt, [0.0, 0.8, 0.0, 0.0, 0.0])
    assert torch.equal(opt.state[p]["momentum"], torch.tensor([0.25, 0.5, -0.25, 0.25, -0.25]))
    assert torch.equal(p.detach(), torch.tensor([-1.0, -1.0, 1.0, -1.0, 1.0]))  # only element 1 flipped
    assert set(p.detach().abs().tolist()) == {1.0}  # still binary


def test_bop_threshold_is_strict_and_gamma_is_the_adaptivity_rate() -> None:
    p, opt = _bop([1.0, 1.0], gamma=0.25, threshold=0.25)
    _step(p, opt, [1.0, 2.0])  # m = [0.25, 0.5]: 0.25 is not above the threshold
    assert torch.equal(p.detach(), torch.tensor([1.0, -1.0]))
    p, opt = _bop([1.0], gamma=1e-4, threshold=1e-8)  # larq's defaults: one agreeing gradient of 1e-3 flips
    _step(p, opt, [1e-3])
    assert p.item() == -1.0


def test_real_parameters_follow_adam_exactly() -> None:
    torch.manual_seed(0)
    real = nn.Parameter(torch.randn(5))
    twin = nn.Parameter(real.detach().clone())
    binary = nn.Parameter(torch.ones(3))
    bop = Bop([{"params": [real]}, {"params": [binary], "bop": True}], lr=0.01, weight_decay=0.1)
    adam = torch.optim.Adam([twin], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(5)
        real.grad, twin.grad, binary.grad = g.clone(), g.clone(), torch.full((3,), -1.0)
        bop.step()
        adam.step()
    assert torch.equal(real, twin) and torch.equal(binary.detach(), torch.ones(3))  # w m < 0: no flip


def test_bop_state_round_trips_through_a_checkpoint() -> None:
    p, opt = _bop([1.0, -1.0, 1.0], gamma=0.3, threshold=0.05)
    _step(p, opt, [0.1, 0.1, -0.1])
    q, resumed = _bop(p.detach().tolist(), gamma=0.3, threshold=0.05)
    resumed.load_state_dict(opt.state_dict())
    for g in ([0.2, -0.3, 0.1], [0.05, 0.05, 0.05]):
        _step(p, opt, g)
        _step(q, resumed, g)
        assert torch.equal(p, q)


def test_optimizer_bop_needs_uncentred_layers_and_starts_from_their_signs() -> None:
    conv = nn.Sequential(BinaryConv2d(4, 4, 3, centre_weights=True))
    with pytest.raises(ValueError, match="centre_weights=False"):
        build_optimizer(conv, "bop", lr=1e-3)
    layer = BinaryConv2d(4, 4, 3, centre_weights=False, scale="channel")
    nn.init.normal_(layer.weight)
    opt = build_optimizer(nn.Sequential(layer), "bop", lr=1e-3)
    assert set(layer.weight.detach().abs().unique().tolist()) == {1.0}
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["bop"]["params"] == [layer.weight] and groups["bop"]["bop"]
    assert groups["scales"]["params"] == [layer.scale_factor.alpha] and not groups["scales"]["bop"]


def test_training_with_bop_keeps_binary_weights_and_exports_them(make_cfg, tmp_path: Path) -> None:
    results = train(make_cfg("optimizer=bop", "optimizer.gamma=0.01", out=tmp_path / "bop"))
    assert results["model_args"]["centre_weights"] is False and results["global_step"] == 2
    ckpt = torch.load(tmp_path / "bop" / "checkpoints" / "last.pt", weights_only=True)
    from xnorpp.export import build_model_from_args

    model = build_model_from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    binary = [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.binarize_weights]
    assert binary and all(set(m.weight.abs().unique().tolist()) == {1.0} for m in binary)
    assert all(not m.centre_weights for m in binary)
    model.eval()
    export_model(model, ckpt["model_args"], tmp_path / "bop.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load_export(tmp_path / "bop.safetensors")(x), model(x), atol=1e-5)
