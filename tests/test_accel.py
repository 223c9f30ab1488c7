"""The speed switchboard: a run's switches applied and restored, what ran reported, the library's defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from xnorpp import accel
from xnorpp.nn import BinaryConv2d, int8_conv, kernels


def _switches() -> tuple[str, bool]:
    return kernels.kernel_mode(), int8_conv.int8_conv_enabled()


def test_configure_applies_a_runs_switches_and_restores_the_previous_ones() -> None:
    before = _switches()
    with accel.configure({"kernels": "eager", "int8_conv": False, "malloc": "system"}) as speed:
        assert _switches() == ("eager", False)
        BinaryConv2d(8, 8, 3, padding=1, bias=False)(torch.randn(2, 8, 6, 6))
        report = speed.report()
    assert _switches() == before
    assert report["kernels"] == "eager" and report["int8_conv"] is False and report["c_kernels"] is False
    assert report["malloc"] == "system" and report["allocator"] in ("glibc", "jemalloc", "system")


def test_report_says_what_ran_inside_the_block() -> None:
    conv = BinaryConv2d(8, 8, 3, padding=1, bias=False, scale="channel")
    with accel.configure({"kernels": "eager", "int8_conv": True, "malloc": "system"}) as speed:
        assert speed.report()["int8_conv"] is False  # nothing ran yet
        conv(torch.randn(2, 8, 6, 6))  # fp32 on CPU: an exact int8 conv where the kernel works
        assert speed.report()["int8_conv"] is int8_conv.int8_conv_active()


def test_the_allocator_policy_is_a_cpu_setting() -> None:
    with accel.configure({"kernels": "eager", "malloc": "jemalloc"}, device="cuda") as speed:  # not applied
        assert speed.report()["malloc"] is None


@pytest.mark.parametrize(
    ("given", "message"),
    [({"kernels": "fast"}, "trainer.kernels: .*valid choices: eager, compiled"),
     ({"int8_conv": "maybe"}, "trainer.int8_conv must be true or false, got 'maybe'"),
     ({"malloc": "tcmalloc"}, "trainer.malloc: .*valid choices: auto, keep, system, jemalloc")],
)  # fmt: skip
def test_a_wrong_value_names_the_key_and_the_choices(given: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        accel.configure(given)


def test_plain_library_use_gets_the_safe_defaults_on_import() -> None:
    """``import xnorpp`` switches on the compiled kernels and the int8 conv; the allocator stays the process's."""
    code = (
        "import xnorpp; from xnorpp.nn import kernels, int8_conv; from xnorpp.engine import memory; "
        "print(kernels.kernel_mode(), int8_conv.int8_conv_enabled(), xnorpp.accel.LIBRARY_DEFAULTS.malloc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["compiled", "True", "system"]
