"""CUDA checks (``pytest -m gpu``, deselected by default): the binary layers on a GPU, in fp32, bf16, fp16.

They need a CUDA device; without one they are skipped, so the default run deselects them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import xnorpp  # noqa: F401  (registers the models)
from xnorpp.nn import BinaryConv2d, kernels
from xnorpp.nn.fused import set_fused
from xnorpp.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def conv_on_cuda(cin: int = 16, cout: int = 32, seed: int = 0) -> BinaryConv2d:
    torch.manual_seed(seed)
    conv = BinaryConv2d(cin, cout, 3, padding=1, bias=False, scale="rank1", output_size=(12, 12))
    with torch.no_grad():
        conv.weight.normal_()
        for p in conv.scale_factor.parameters():
            p.uniform_(0.5, 1.5)
    return conv.to(CUDA)


def forward_backward(conv: BinaryConv2d, x: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    set_fused(conv, fused)
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = conv(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator(CUDA).manual_seed(1), device=CUDA))
    return [out.detach(), x.grad, *(p.grad for p in conv.parameters())]  # type: ignore[list-item]


def test_fused_equals_unfused_bit_for_bit_on_cuda() -> None:
    torch.backends.cudnn.deterministic = True  # the same (deterministic) algorithms for both paths
    try:
        conv = conv_on_cuda()
        x = torch.randn(8, 16, 12, 12, device=CUDA) * 1.5
        x.view(-1)[:4] = torch.tensor([-1.0, 1.0, 0.0, -0.0])
        for a, b in zip(forward_backward(conv, x, True), forward_backward(conv, x, False)):
            assert torch.equal(a, b), (a - b).abs().max()
    finally:
        torch.backends.cudnn.deterministic = False


def test_compiled_sign_kernel_runs_on_cuda_and_matches_eager() -> None:
    old = kernels.get_kernels()
    kernels.set_kernels("compiled")
    try:
        x = torch.randn(4, 8, 16, 16, device=CUDA).contiguous(memory_format=torch.channels_last) * 1.5
        for dtype in (torch.float32, torch.bfloat16):
            s, code = kernels.sign_code(x, dtype)
            assert kernels.get_kernels() == "compiled"  # Triton compiled it
            eager_s, eager_code = kernels._sign_code(x, dtype)
            assert torch.equal(s, eager_s) and torch.equal(code, eager_code)
            assert s.is_contiguous(memory_format=torch.channels_last)
    finally:
        kernels.set_kernels(old)


def test_bf16_autocast_binary_conv_is_exact_below_256() -> None:
    conv = conv_on_cuda(cin=16)  # |sum| <= 16 * 9 = 144: exact in bf16
    with torch.no_grad():
        for p in conv.scale_factor.parameters():
            p.fill_(1.0)  # Gamma = 1: the output is the integer sum itself
    x = torch.randn(4, 16, 12, 12, device=CUDA)
    with torch.no_grad():
        fp32 = conv(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = conv(x)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(fp32, fp32.round()) and fp32.abs().max() <= 144
    assert torch.equal(bf16.float(), fp32)


def test_fused_layer_uses_less_cuda_memory_than_unfused() -> None:
    def held_for_backward(fused: bool) -> int:
        conv = conv_on_cuda(cin=64, cout=64)
        set_fused(conv, fused)
        x = torch.randn(64, 64, 12, 12, device=CUDA, requires_grad=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = conv(x)
        held = torch.cuda.memory_allocated() - base  # saved tensors + the output
        out.sum().backward()
        return held

    fused, unfused = held_for_backward(True), held_for_backward(False)
    assert fused < 0.6 * unfused, (fused, unfused)


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_training_on_cuda_in_mixed_precision_channels_last(make_cfg, tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    cfg = make_cfg(
        "trainer.device=cuda", f"trainer.precision={precision}", "trainer.channels_last=true",
        "trainer.kernels=compiled", "binarization=full_binary", out=out,
    )  # fmt: skip
    results = train(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 2 and saved["kernels"] == "compiled"
    assert all(
        isinstance(h["train/loss"], float) and h["train/loss"] == h["train/loss"] for h in saved["history"]
    )


def test_resnet18_overfits_a_batch_on_cuda_in_bf16() -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "resnet18_preact_bin", binarization="full_binary", scale="rank1", num_classes=10, input_size=32,
        stem="small",
    ).to(CUDA, memory_format=torch.channels_last)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=CUDA)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
