"""Reference XNOR-popcount binary convolution: the binary conv with integer bit operations only.

For two vectors ``a, b`` in ``{-1, +1}^n`` encoded as bits (``1`` for ``+1``, ``0`` for ``-1``),
``a . b = (#agree) - (#disagree) = n - 2 * popcount(a XOR b)``.

A convolution of the sign map is a dot product per output position between the unfolded input patch
(``C_in/groups * kh * kw`` values, ordered ``(c, i, j)`` like ``weight.reshape(C_out, -1)``) and a
filter. Zero padding is applied *after* the sign in :class:`~xnorpp.nn.BinaryConv2d`, so padded taps
are ``0`` (neither ``+1`` nor ``-1``) and must not be counted. Each patch therefore carries a validity
mask ``v`` (``1`` inside the image, ``0`` on padding) and

``dot = popcount(v) - 2 * popcount((x XOR w) AND v)``

which equals ``F.conv2d(sign(x), sign(w), padding=p)`` exactly. Bits are packed 64 per ``int64`` word
(element ``k`` of the patch goes to bit ``k mod 64`` of word ``k // 64``; trailing bits of the last
word are 0 in ``x``, ``w`` and ``v``, so they never count). Signs use the project's convention
``sign(0) = +1``.

Speed is not a goal: this is an executable proof that the float simulation computes what an
XNOR-popcount kernel would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from .conv import BinaryConv2d

__all__ = [
    "WORD_BITS",
    "pack_words",
    "popcount",
    "unfold_bits",
    "xnor_conv2d_reference",
    "xnor_popcount_conv2d",
]

WORD_BITS = 64

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F


def popcount(x: Tensor) -> Tensor:
    """Number of set bits of every element of an ``int64`` tensor (two's complement), as ``int64``.

    Uses ``torch.bitwise_count`` when the installed torch has it, else the SWAR bit trick
    (pairwise sums of 1-, 2-, 4-bit fields, then of the 8 byte counts), integer ops only.
    """
    if x.dtype != torch.int64:
        raise TypeError(f"popcount expects an int64 tensor, got {x.dtype}")
    native = getattr(torch, "bitwise_count", None)
    if native is not None:
        return native(x).to(torch.int64)
    # (x >> 1) is an arithmetic shift; the masks clear the sign-extended bits.
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4  # per-byte counts <= 8; the value is now non-negative
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def pack_words(bits: Tensor) -> Tensor:
    """Pack a 0/1 tensor along its last axis into ``int64`` words (bit ``k % 64`` of word ``k // 64``).

    Shape ``(..., K) -> (..., ceil(K / 64))``; the last word is zero-padded.
    """
    k = bits.shape[-1]
    n_words = max(1, -(-k // WORD_BITS))
    b = bits.to(torch.int64)
    pad = n_words * WORD_BITS - k
    if pad:
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
    b = b.reshape(*b.shape[:-1], n_words, WORD_BITS)
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=b.device)
    # the bits are disjoint, so the sum is a bitwise OR (bit 63 gives the int64 sign bit, no overflow)
    return (b << shifts).sum(dim=-1)


def unfold_bits(
    bits: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """im2col of an integer 0/1 map ``(N, C, H, W)`` with zero padding, plus the padding mask.

    Returns ``patches`` of shape ``(N, L, C*kh*kw)`` (``L = H_out*W_out``, patch axis ordered
    ``(c, i, j)``) and ``valid`` of shape ``(L, C*kh*kw)``: 1 where the tap reads the image, 0 where it
    reads padding.
    """
    _, c, h, w = bits.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"empty convolution output {h_out}x{w_out} for a {h}x{w} input")
    xp = torch.nn.functional.pad(bits.to(torch.int64), (pw, pw, ph, ph))
    ones = torch.nn.functional.pad(
        torch.ones(1, 1, h, w, dtype=torch.int64, device=bits.device), (pw, pw, ph, ph)
    )

    def taps(t: Tensor) -> Tensor:
        cols = []
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dh, j * dw
                cols.append(t[:, :, r0 : r0 + sh * (h_out - 1) + 1 : sh, c0 : c0 + sw * (w_out - 1) + 1 : sw])
        # (N, C, kh*kw, H_out, W_out) -> (N, L, C*kh*kw) with the patch axis ordered (c, i, j)
        s = torch.stack(cols, dim=2)
        return s.reshape(s.shape[0], s.shape[1] * kh * kw, h_out * w_out).transpose(1, 2)

    patches = taps(xp)
    valid = taps(ones.expand(1, c, -1, -1))[0]
    return patches, valid


def _sign_bits(t: Tensor) -> Tensor:
    """Bit ``1`` for ``+1`` (``t >= 0``, the ``sign(0) = +1`` convention) and ``0`` for ``-1``."""
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    return (t >= 0).to(torch.int64)


def xnor_popcount_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """Binary convolution ``sign(x) (*) sign(weight)`` by XNOR/popcount on packed bits, as ``int64``.

    ``x`` is ``(N, C_in, H, W)`` and ``weight`` ``(C_out, C_in/groups, kh, kw)``, real-valued (their
    signs are taken, ``sign(0) = +1``) or ``bool`` (``True`` = ``+1``). Per output position and filter,

    ``out = popcount(v) - 2 * popcount((x XOR w) AND v)``

    with ``x``, ``w`` the packed sign bits of the patch and the filter and ``v`` the packed validity
    mask (0 on zero-padding taps, which contribute 0 to the float conv). Only integer bit operations,
    additions and shifts are used. Equals ``F.conv2d(sign(x), sign(weight), None, stride, padding,
    dilation, groups)`` exactly (as integers).
    """
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported: pass integers")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"expected 4-d input and weight, got {tuple(x.shape)} and {tuple(weight.shape)}")
    ks = (int(weight.shape[2]), int(weight.shape[3]))
    st, pd, dl = _pair(stride), _pair(padding), _pair(dilation)
    c_in, c_out = x.shape[1], weight.shape[0]
    if c_in % groups or c_out % groups or weight.shape[1] != c_in // groups:
        raise ValueError(
            f"input channels {c_in}, weight {tuple(weight.shape)} and groups={groups} do not match"
        )
    xbits, wbits = _sign_bits(x), _sign_bits(weight)
    cg, og = c_in // groups, c_out // groups
    outs = []
    for g in range(groups):
        patches, valid = unfold_bits(xbits[:, g * cg : (g + 1) * cg], ks, st, pd, dl)
        xw = pack_words(patches)  # (N, L, words)
        vw = pack_words(valid)  # (L, words)
        ww = pack_words(wbits[g * og : (g + 1) * og].reshape(og, -1))  # (O_g, words)
        diff = (xw[:, None, :, :] ^ ww[None, :, None, :]) & vw[None, None]  # (N, O_g, L, words)
        n_valid = popcount(vw).sum(dim=-1)  # (L,)
        outs.append(n_valid - 2 * popcount(diff).sum(dim=-1))  # (N, O_g, L)
    out = torch.cat(outs, dim=1)
    h_out = (x.shape[2] + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    w_out = (x.shape[3] + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    return out.reshape(x.shape[0], c_out, h_out, w_out)


@torch.no_grad()
def xnor_conv2d_reference(conv: BinaryConv2d, x: Tensor) -> Tensor:
    """``conv(x)`` recomputed with the integer XNOR-popcount path: ``(popcount conv) . Gamma + bias``.

    Needs ``binarize_weights`` and ``binarize_inputs`` and zero padding. The weight signs are
    ``conv.binary_weight()`` (``sign(W - mean_dim1 W)``); the integer result is cast to ``x``'s dtype
    (exact below ``2^24`` in fp32) and goes through the layer's own scale factor, then the bias.
    """
    if not (conv.binarize_weights and conv.binarize_inputs):
        raise ValueError("xnor_conv2d_reference needs a BinaryConv2d with binary weights and inputs")
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
    w = conv.binary_weight().detach()
    y_int = xnor_popcount_conv2d(x, w, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = y_int.to(x.dtype)
    if conv.scale != "none":
        y = conv.scale_factor(y, conv.scaled_weight_source().detach(), x)
    if conv.bias is not None:
        y = y + conv.bias.view(1, -1, 1, 1)
    return y
