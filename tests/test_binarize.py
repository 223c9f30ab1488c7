"""``xnorpp.binarize``: any timm CNN made binary by a policy, and what works with it afterwards."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import xnorpp
from xnorpp.engine.health import BinarizationHealth
from xnorpp.export import build_model_from_args, export_model, load_export
from xnorpp.models import create_binarized
from xnorpp.nn import BinarizePolicy, BinaryConv2d, BinaryLinear, binarize
from xnorpp.nn.fused import has_fused, set_fused
from xnorpp.run import train

# timm family -> (model, name of its first conv)
FAMILIES = {
    "resnet": ("resnet10t", "conv1.0"),
    "mobilenet": ("mobilenetv2_035", "conv_stem"),
    "efficientnet": ("test_efficientnet", "conv_stem"),
    "densenet": ("densenet121", "features.conv0"),
}


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_and_counts_binary_weights_as_the_policy_says(family: str) -> None:
    """Default policy: every plain conv binary but the first and the depthwise ones, linears real."""
    name, first = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    expected = sum(m.weight.numel() for n, m in convs.items() if n != first and not _depthwise(m))
    weights = {n: m.weight.detach().clone() for n, m in convs.items()}
    binarize(model, input_size=32)

    layers = dict(model.named_modules())
    assert type(layers[first]) is nn.Conv2d and all(
        type(m) is nn.Linear for m in layers.values() if isinstance(m, nn.Linear)
    )
    for n, w in weights.items():  # copied, binary or not
        assert torch.equal(layers[n].weight, w), n
    binary = [n for n, m in layers.items() if isinstance(m, BinaryConv2d)]
    assert binary and all(layers[n].binarize_weights and layers[n].binarize_inputs for n in binary)
    assert sorted(binary) == sorted(model.binarization_map.binary_layers)
    assert xnorpp.summary(model, 32).params_binary == model.binarization_map.params_binary == expected

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(layers[n].weight, weights[n]) for n in binary)  # the latent weights learn


def _toy() -> nn.Module:
    """stem -> [conv 3x3, depthwise 3x3, 1x1] -> shortcut 1x1 -> pool -> fc."""

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1),
            )  # fmt: skip
            self.shortcut = nn.Conv2d(8, 16, 1, stride=1)
            self.unused = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            h = self.body(h) + self.shortcut(h)
            return self.head(h.mean((2, 3)))

    return Toy()


def _plan(model: nn.Module) -> dict[str, tuple[bool, bool, str]]:
    return {p.name: (p.binarize_weights, p.binarize_inputs, p.scale) for p in model.binarization_map.layers}


def test_policy_rules_and_the_reasons_in_the_map() -> None:
    model = binarize(_toy(), input_size=8)
    plans = {p.name: p for p in model.binarization_map.layers}
    assert [p.name for p in model.binarization_map.layers][:5] == [
        "stem",
        "body.0",
        "body.3",
        "body.4",
        "shortcut",
    ]
    assert plans["stem"].reason.startswith("first") and plans["head"].reason.startswith("last")
    assert plans["body.3"].kind == "depthwise 3x3" and not plans["body.3"].binary
    assert plans["shortcut"].role == "downsample" and plans["shortcut"].binary  # full binary: shortcuts too
    assert plans["unused"].reason == "not run by the forward" and plans["unused"].output_size is None
    assert isinstance(model.body[2], nn.PReLU)  # binary inputs: ReLUs replaced, so signs are not all +1
    # real downsample, 1x1 real, depthwise and the classifier binary, last kept binary too
    policy = BinarizePolicy(downsample=False, pointwise=False, depthwise=True, linear=True, keep_last=False,
                            relu="keep")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # body.3 follows the ReLU: flagged, tested below
        model = binarize(_toy(), policy, input_size=8)
    got = _plan(model)
    assert got["shortcut"] == got["body.4"] == (False, False, "none")
    assert got["body.3"] == got["head"] == (True, True, "channel")
    assert isinstance(model.head, BinaryLinear) and model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_include_exclude_and_overrides_by_name_or_regex() -> None:
    policy = {"include": ["body"], "exclude": [r"body\.4"], "scale": "rank1", "relu": "identity",
              "overrides": {"body.0": {"scale": "none", "estimator": "approx_sign"},
                            "stem": {"binarize_weights": True, "binarize_inputs": False}}}  # fmt: skip
    model = binarize(_toy(), policy, input_size=8)
    got = _plan(model)
    assert got["body.0"] == (True, True, "none") and model.body[0].estimator == "approx_sign"
    assert got["body.4"] == got["shortcut"] == (False, False, "none")  # excluded / not included
    assert got["stem"] == (True, False, "rank1")  # an override wins over keep_first
    assert model.stem.scale_factor.out_size == (8, 8)  # rank-1 sized from the traced forward
    with pytest.raises(ValueError, match="valid keys: binarize_weights"):
        BinarizePolicy(overrides={"stem": {"bits": 2}})
    with pytest.raises(ValueError, match="not a valid regex"):
        BinarizePolicy(exclude=["body["])


def test_spatial_scales_take_output_sizes_from_the_traced_forward() -> None:
    model = binarize(timm.create_model("resnet10t", num_classes=10), {"scale": "rank1"}, input_size=(32, 48))
    for plan in model.binarization_map.layers:
        if plan.binary:
            conv = dict(model.named_modules())[plan.name]
            assert conv.scale_factor.out_size == plan.output_size
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="built for a"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not binary yet"):
        binarize(model)


def test_relu_kept_before_binary_inputs_is_flagged() -> None:
    with pytest.warns(UserWarning, match="no negative input"):
        model = binarize(timm.create_model("resnet10t", num_classes=10), {"relu": "keep"}, input_size=32)
    assert "every sign is +1" in model.binarization_map.table()


MODEL_ARGS = {
    "name": "resnet10t", "binarization": "real_downsample", "scale": "rank1", "num_classes": 10, "in_chans": 3,
    "input_size": 32, "stem": "imagenet", "estimator": "ste", "binarize": {"keep_last": True},
}  # fmt: skip


def test_variants_carry_their_meaning_to_timm_models() -> None:
    def flags(variant: str) -> set[tuple[str, bool, bool]]:
        model = create_binarized({**MODEL_ARGS, "binarization": variant})
        return {(p.role, p.binarize_weights, p.binarize_inputs) for p in model.binarization_map.layers}

    assert flags("fp") == {("first", False, False), ("", False, False), ("downsample", False, False),
                           ("last", False, False)}  # fmt: skip
    assert ("downsample", False, False) in flags("real_downsample") and ("", True, True) in flags(
        "real_downsample"
    )
    assert ("downsample", True, True) in flags("full_binary")
    assert {("", True, False), ("downsample", False, False)} <= flags("weight_only")
    assert ("", False, True) in flags("activation_only")


def test_summary_export_health_and_fused_path_work_on_a_binarized_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model_from_args(MODEL_ARGS)
    assert has_fused(model)  # ste, integer padding: the fused binary conv
    x = torch.randn(2, 3, 32, 32)
    model.train()
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    set_fused(model, False)
    unfused = model(x)
    unfused.sum().backward()
    assert torch.allclose(out, unfused, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-4, rtol=1e-4), n
    health = BinarizationHealth(model, 1).compute()
    assert health["health/frozen"] == 0.0 and any(k.endswith("/scale_mean") for k in health)
    model.eval()
    report = export_model(model, MODEL_ARGS, tmp_path / "m.safetensors")
    assert len(report.packed_layers) == len(model.binarization_map.binary_layers)
    loaded = load_export(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_model_timm_trains_from_the_command_line_config(make_cfg) -> None:
    results = train(
        make_cfg("model=timm", "model.name=test_resnet", "binarization=full_binary", "scale=channel")
    )
    assert results["global_step"] == 2 and results["model_args"]["binarize"]["keep_first"] is True
    rows = results["binarization_map"]
    assert rows[0]["role"] == "first" and not rows[0]["binarize_weights"]
    assert results["params/binary"] == sum(r["weight_params"] for r in rows if r["binarize_weights"]) > 0


def test_model_kwargs_reach_the_binarized_timm_model_and_checkpoints_compare_the_method_keys(
    tmp_path: Path,
) -> None:
    """``model.kwargs`` are timm's arguments for ``model=timm`` too; a checkpoint of another block, policy or
    weight centring (Bop's) is refused instead of loading into a model that computes something else."""
    from xnorpp.engine.checkpoint import CheckpointError
    from xnorpp.engine.checkpointer import Checkpointer
    from xnorpp.export import build_model_from_args

    args = {"name": "resnet10t", "binarization": "full_binary", "scale": "channel", "num_classes": 3,
            "in_chans": 3, "input_size": 32, "estimator": "ste", "binarize": {}, "kwargs": {"drop_rate": 0.5}}  # fmt: skip
    assert build_model_from_args(args).drop_rate == 0.5
    base = {"name": "resnet18_preact_bin", "binarization": "full_binary", "scale": "rank1"}
    for changed in ({"block": "bireal"}, {"centre_weights": False}, {"binarize": {"linear": True}}):
        with pytest.raises(CheckpointError, match=next(iter(changed))):
            Checkpointer.check_model({"model_args": {**base, **changed}}, base, tmp_path / "c.pt")
    Checkpointer.check_model(
        {"model_args": {**base, "block": "preact"}}, base, tmp_path / "c.pt"
    )  # the default
