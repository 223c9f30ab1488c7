"""Smoke tests of ``python -m xnorpp.bench`` (tiny sizes; nothing is asserted about speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xnorpp.bench import CONFIGS, NaiveRank1Scale, build_config, format_table, main, naive_sign, run_isolated
from xnorpp.nn import BinaryConv2d, sign_ste

TINY = ["--image-size", "16", "--batch-size", "4", "--steps", "1", "--warmup", "0", "--repeats", "1"]
TINY += ["--kernels", "eager", "--malloc", "system"]  # in this process: no compiling, no allocator change


def test_bench_main_in_process_writes_json_with_expected_keys(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bench.json"
    out = main([*TINY, "--in-process", "--json", str(path)])
    assert "| xnorpp |" in capsys.readouterr().out
    written = json.loads(path.read_text())
    assert written["results"][0]["settings"]["batch_size"] == 4
    assert written["results"][0]["configs"]["xnorpp"]["live_peak_mb"] is None  # NaN is not JSON
    (result,) = out["results"]
    assert set(result["configs"]) == {"floor", "xnorpp", "naive"}
    for c in result["configs"].values():
        assert c["img_s"] > 0 and c["saved_mb"] > 0 and c["peak_rss_mb"] >= 0
        assert math.isnan(c["live_peak_mb"])  # measured in worker processes only
    ratios = result["ratios"]["xnorpp"]
    for key in ("img_s_vs_floor", "img_s_vs_naive", "saved_vs_floor", "saved_vs_naive"):
        assert ratios[key] > 0
    assert {"img_s_vs_floor", "img_s_vs_naive"} <= set(result["targets"])
    assert result["settings"]["int8_conv"] is True and "int8 conv on" in format_table(result)
    xn, floor = result["configs"]["xnorpp"], result["configs"]["floor"]
    assert xn["int8_conv"] and not floor["int8_conv"]  # what each configuration ran
    assert not xn["c_kernels"] and "eager kernels, int8" in format_table(result)  # --kernels eager
    # the deterministic companion: the naive net saves its fp32 activations, xnorpp bits
    assert result["configs"]["xnorpp"]["saved_mb"] < result["configs"]["naive"]["saved_mb"]


@pytest.mark.slow  # in `pytest -m slow`: keeps the default run under 10 minutes
def test_run_isolated_measures_peaks_in_a_fresh_process() -> None:
    res = run_isolated(
        {
            "name": "xnorpp",
            "image_size": 16,
            "batch_size": 4,
            "steps": 1,
            "warmup": 0,
            "measure_live_peak": True,
        }
    )
    assert res["config"] == "xnorpp" and res["img_s"] > 0
    assert res["peak_rss_mb"] > 0 and res["live_peak_mb"] > 0
    assert res["kernels"] == "compiled"  # the worker compiled the sign kernel (a C++ compiler is here)
    assert res["int8_conv"] is True  # fp32 on CPU: the forward convs ran as exact int8 convs
    assert res["c_kernels"] is True  # and the element-wise work in the C kernels


def test_naive_reference_is_the_same_math() -> None:
    x = torch.tensor([-2.0, -1.0, -0.0, 0.5, 1.0, 3.0], requires_grad=True)
    naive_sign(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    sign_ste(x2).sum().backward()
    assert torch.equal(naive_sign(x), sign_ste(x2)) and torch.equal(x.grad, x2.grad)  # type: ignore[arg-type]

    data = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    losses = {}
    for name in CONFIGS[1:]:
        torch.manual_seed(0)
        model = build_config(name, 16, 10, "small")
        losses[name] = F.cross_entropy(model(data), torch.tensor([1, 2, 3, 4])).item()
        convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
        assert convs and all(isinstance(m.scale_factor, NaiveRank1Scale) == (name == "naive") for m in convs)
        assert all(m.fused == (name == "xnorpp") for m in convs)
    assert losses["xnorpp"] == losses["unfused"]
    assert math.isclose(losses["naive"], losses["xnorpp"], rel_tol=1e-5)
