"""The integer XNOR-popcount convolution equals the float simulation of the binary convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xnorpp.nn import BinaryConv2d, binary_sign, conv_output_size
from xnorpp.nn.xnor_popcount import (
    pack_words,
    popcount,
    unfold_bits,
    xnor_conv2d_reference,
    xnor_popcount_conv2d,
)


def test_popcount_matches_bit_by_bit_count() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**62), 2**62, (2000,), generator=g) * 2 + torch.randint(0, 2, (2000,), generator=g)
    x = torch.cat([x, torch.tensor([0, -1, -(2**63), 2**63 - 1, 1, 2**32])])
    naive = sum((x >> i) & 1 for i in range(64))
    out = popcount(x)
    assert out.dtype == torch.int64
    assert torch.equal(out, naive)
    with pytest.raises(TypeError, match="int64"):
        popcount(x.to(torch.int32))


def test_pack_words_bit_order() -> None:
    # element k -> bit k % 64 of word k // 64; the last word is zero-padded
    bits = torch.zeros(130, dtype=torch.int64)
    bits[[0, 3, 63, 64, 129]] = 1
    words = pack_words(bits)
    assert words.shape == (3,)
    assert words[0].item() == 1 + 8 - 2**63  # bit 63 is the int64 sign bit
    assert words[1].item() == 1
    assert words[2].item() == 2
    assert popcount(words).sum().item() == 5


def test_unfold_bits_validity_mask() -> None:
    bits = torch.ones(1, 2, 3, 3, dtype=torch.int64)
    patches, valid = unfold_bits(bits, (3, 3), (1, 1), (1, 1), (1, 1))
    assert patches.shape == (1, 9, 18) and valid.shape == (9, 18)
    # corner output (0, 0): the top row and left column of the 3x3 window read padding
    corner = valid[0].reshape(2, 3, 3)
    assert corner[:, 0].sum() == 0 and corner[:, :, 0].sum() == 0 and corner[:, 1:, 1:].sum() == 8
    assert valid[4].sum() == 18  # centre output sees no padding
    assert torch.equal(patches, valid[None])  # all-ones input: patch bits are exactly the mask


# (C_in, C_out, kernel, stride, padding, dilation, groups): channel counts not multiples of 64
CASES = [
    (3, 4, 3, 1, 1, 1, 1),
    (5, 3, 3, 1, 0, 1, 1),
    (70, 6, 3, 2, 2, 1, 1),
    (33, 5, 1, 1, 0, 1, 1),
    (100, 4, 1, 2, 1, 1, 1),
    (65, 4, 3, 1, 2, 2, 1),
    (130, 3, 3, 2, 1, 1, 1),
    (7, 5, 3, 2, 2, 2, 1),
    (12, 6, 3, 1, 1, 1, 3),
]


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "dilation", "groups"), CASES)
def test_popcount_conv_equals_float_sign_conv(
    cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int
) -> None:
    g = torch.Generator().manual_seed(cin * 100 + k)
    x = torch.randn(2, cin, 7, 9, generator=g)
    w = torch.randn(cout, cin // groups, k, k, generator=g)
    x[0, 0, :2] = 0.0  # exact zeros: sign(0) = +1 on both paths
    out = xnor_popcount_conv2d(x, w, stride, padding, dilation, groups)
    assert not out.dtype.is_floating_point and out.dtype == torch.int64
    ref = F.conv2d(binary_sign(x), binary_sign(w), None, stride, padding, dilation, groups)
    assert out.shape == ref.shape
    assert torch.equal(ref, ref.round())  # the float simulation is integer-valued
    assert torch.equal(out, ref.to(torch.int64))


def test_popcount_conv_accepts_bool_bits_and_tuples() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 6, 5, generator=g)
    w = torch.randn(4, 9, 3, 1, generator=g)
    out = xnor_popcount_conv2d(x >= 0, w >= 0, (2, 1), (2, 0), (1, 1))
    ref = F.conv2d(binary_sign(x), binary_sign(w), None, (2, 1), (2, 0), (1, 1))
    assert torch.equal(out, ref.to(torch.int64))


def test_popcount_conv_rejects_bad_arguments() -> None:
    x, w = torch.randn(1, 4, 5, 5), torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="string padding"):
        xnor_popcount_conv2d(x, w, padding="same")
    with pytest.raises(ValueError, match="groups"):
        xnor_popcount_conv2d(x, w, groups=3)


def _random_conv(scale: str, stride: int, padding: int, bias: bool, size: tuple[int, int]) -> BinaryConv2d:
    out_size = conv_output_size(size, 3, stride, padding)
    conv = BinaryConv2d(
        67, 10, 3, stride=stride, padding=padding, bias=bias, scale=scale, output_size=out_size
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
        for p in conv.scale_factor.parameters():
            p.uniform_(0.2, 2.0)
    return conv


@pytest.mark.parametrize("scale", ["none", "channel", "rank1", "full", "channel_spatial", "xnor", "xnor_k"])
@pytest.mark.parametrize(("stride", "padding", "bias"), [(1, 1, False), (2, 2, True), (1, 0, True)])
def test_reference_matches_binary_conv(scale: str, stride: int, padding: int, bias: bool) -> None:
    torch.manual_seed(3)
    size = (8, 7)
    conv = _random_conv(scale, stride, padding, bias, size).eval()
    x = torch.randn(2, 67, *size)
    with torch.no_grad():
        want = conv(x)
    got = xnor_conv2d_reference(conv, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-4 * max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"max abs diff {diff} (tolerance {tol})"


def test_reference_needs_binary_weights_and_inputs() -> None:
    conv = BinaryConv2d(4, 4, 3, padding=1, binarize_inputs=False)
    with pytest.raises(ValueError, match="binary weights and inputs"):
        xnor_conv2d_reference(conv, torch.randn(1, 4, 5, 5))
