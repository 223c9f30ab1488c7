"""Decode only what a crop needs: a region of a JPEG, at a reduced DCT scale, resized to the output size.

:func:`decode_resized_crop` returns the ``uint8`` pixels of the crop ``box`` resized to ``size`` (what
torchvision's ``RandomResizedCrop`` makes of a PIL image: bilinear, antialiased) without decoding the
whole image at full size:

- **region**: libjpeg-turbo decodes only the crop's columns (``jpeg_crop_scanline``), skips the inverse
  DCT and colour conversion of the rows above it (``jpeg_skip_scanlines``) and stops after its last row;
  the entropy decoding of the rows down to the crop's last one cannot be skipped (sequential JPEG);
- **DCT scaling**: for crops at least twice the output size, the inverse DCT outputs 4, 2 or 1 pixels
  per 8 (:func:`dct_scale`), and the resize starts from a smaller image;
- **resize**: torch's antialiased bilinear ``uint8`` kernel (PIL's filter, within one level of PIL's
  result, in a third of its time).

At full DCT scale the decoded region holds exactly the full decode's pixels (one more column each side
is decoded, so chroma upsampling never treats the crop's edges as image edges), so the output is
PIL's crop-and-resize within one level. At a reduced scale, part of the downscale is the DCT's own low-pass
(a slightly different filter) and the crop's edges in the scaled image round to the nearest pixel
(at most half a scaled pixel, unbiased).

The region decoder is ``csrc/jpeg_region.c``, built with the system's C compiler against libjpeg(-turbo)
(``jpeglib.h``; Debian/Ubuntu: ``apt-get install libjpeg-dev``) at first use into xnorpp's cache directory
and loaded with ``ctypes``. Without it (no compiler, no ``jpeglib.h``, not Linux), and for files it does
not take (PNGs, CMYK JPEGs), PIL decodes the whole image (a JPEG with its ``draft`` DCT scaling).
:func:`region_decoder_available` says whether it runs, :func:`region_decoder_reason` why not.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..nn.native import build_library, cache_dir, compiler_hint
from .folder import ImageLoadError

__all__ = [
    "SOURCE",
    "EncodedImage",
    "dct_scale",
    "decode_resized_crop",
    "read_encoded",
    "region_decoder_available",
    "region_decoder_reason",
]

SOURCE = Path(__file__).with_name("csrc") / "jpeg_region.c"
_MSG = 256
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


# ------------------------------------------------------------------------------------ the C library
def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "") or "cc") or shutil.which("gcc")


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, platform.machine(), " ".join(platform.libc_ver())):
        key.update(part.encode())
    return cache_dir() / f"jpeg_region-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` to ``target`` (:func:`~xnorpp.nn.native.build_library`)."""
    build_library(
        lambda out: [compiler, "-O2", "-fPIC", "-shared", str(SOURCE), "-o", out, "-ljpeg"], target,
        hint=lambda err: " (libjpeg's headers: apt-get install libjpeg-dev)" if "jpeglib.h" in err else "",
    )  # fmt: skip


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise RuntimeError(f"it is built on Linux only, this is {platform.system()}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler found: {compiler_hint()}")
    path = _library_path(compiler)
    if not path.exists():
        _build(compiler, path)
    lib = ctypes.CDLL(str(path))
    c_int, buf = ctypes.c_int, ctypes.c_char_p
    out = ctypes.POINTER(c_int)
    lib.xnorpp_jpeg_size.argtypes = [buf, ctypes.c_ulong, out, out, out, buf, c_int]
    lib.xnorpp_jpeg_decode_region.argtypes = [buf, ctypes.c_ulong, *[c_int] * 5, ctypes.c_void_p, buf, c_int]
    lib.xnorpp_jpeg_size.restype = lib.xnorpp_jpeg_decode_region.restype = c_int
    _self_test(lib)
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Decode a region of a small JPEG and compare it with PIL's decode, within 2 levels (PIL may bring
    another libjpeg): catches a library built against headers of another libjpeg than the one loaded."""
    pixels = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[:, None, None], (1, 24, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    w, h, comps, msg = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(_MSG)
    if lib.xnorpp_jpeg_size(
        data, len(data), ctypes.byref(w), ctypes.byref(h), ctypes.byref(comps), msg, _MSG
    ):
        raise RuntimeError(f"self-test: {msg.value.decode(errors='replace')}")
    out = np.empty((10, 12, 3), np.uint8)
    if lib.xnorpp_jpeg_decode_region(data, len(data), 8, 5, 3, 12, 10, out.ctypes.data, msg, _MSG):
        raise RuntimeError(f"self-test: {msg.value.decode(errors='replace')}")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[3:13, 5:17]
    if (w.value, h.value, comps.value) != (24, 32, 3) or np.abs(out.astype(int) - expected).max() > 2:
        raise RuntimeError("self-test: the decoded region differs from PIL's decode")


def _library() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _load()
                except Exception as e:  # no compiler, no jpeglib.h, an unloadable library
                    first = (str(e).strip().splitlines() or [""])[0]
                    _reason = f"{type(e).__name__}: {first}"
                _tried = True
    return _lib


def region_decoder_available() -> bool:
    """Whether libjpeg-turbo's region decoder is built and loaded (builds it on the first call)."""
    return _library() is not None


def region_decoder_reason() -> str | None:
    """Why the region decoder is unavailable (PIL decodes instead), or ``None``."""
    _library()
    return _reason


# ------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class EncodedImage:
    """A file's bytes and the image's size; ``jpeg``: a grey or YCbCr JPEG, which the region decoder reads
    (else PIL decodes)."""

    path: str
    data: bytes
    width: int
    height: int
    jpeg: bool


def read_encoded(path: str) -> EncodedImage:
    """Read ``path`` and its image size from the header (no pixels decoded); errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file {path!r} disappeared since the dataset was indexed") from e
    lib = _library()
    if lib is not None and data[:2] == b"\xff\xd8":
        w, h, comps, msg = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(_MSG)
        rc = lib.xnorpp_jpeg_size(
            data, len(data), ctypes.byref(w), ctypes.byref(h), ctypes.byref(comps), msg, _MSG
        )
        if rc == 0 and comps.value in (1, 3):  # grey or YCbCr; CMYK and YCCK go to PIL
            return EncodedImage(path, data, w.value, h.value, True)
    try:
        with Image.open(io.BytesIO(data)) as img:
            (width, height), jpeg = img.size, img.format == "JPEG" and img.mode in ("L", "RGB")
    except Exception as e:
        raise _load_error(path, e) from e
    return EncodedImage(path, data, width, height, jpeg)


def _load_error(path: str, e: Exception) -> ImageLoadError:
    return ImageLoadError(
        f"cannot read image file {path!r} ({type(e).__name__}: {e}). The file is corrupt, truncated or "
        "not an image: delete or replace it."
    )


def dct_scale(crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
    """The DCT scale ``M`` (of ``M / 8``) for a crop: the smallest of 1, 2, 4, 8 that keeps the scaled crop
    at least ``out`` in both directions. libjpeg-turbo's inverse DCTs at the other scales (3/8, 5/8,
    6/8, 7/8) are plain C: decoding at those and resizing less measured slower than decoding at full size."""
    for m in (1, 2, 4):
        if crop_w * m >= 8 * out_w and crop_h * m >= 8 * out_h:
            return m
    return 8


def decode_resized_crop(
    img: EncodedImage,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    dct_scaling: bool = True,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Tensor:
    """``uint8`` ``H x W x 3`` pixels of the crop ``box = (top, left, height, width)`` (full-size pixels)
    resized to ``size = (H, W)``; see the module docstring."""
    lib = _library()
    if img.jpeg and lib is not None:
        m = dct_scale(box[3], box[2], size[1], size[0]) if dct_scaling else 8
        region = _turbo_region(lib, img, m, box)
    else:
        region = _pil_region(img, box, size, dct_scaling)
    return _resize(region, size, resample)


def _scaled_box(
    box: tuple[int, int, int, int], s: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the crop ``box`` in the image scaled by ``s`` (``width x height``), its
    fractional edges rounded to the nearest pixel (at most half a scaled pixel off, unbiased)."""
    top, left, h, w = box
    x0, y0 = min(round(left * s), width - 1), min(round(top * s), height - 1)
    x1, y1 = max(x0 + 1, min(width, round((left + w) * s))), max(y0 + 1, min(height, round((top + h) * s)))
    return x0, y0, x1, y1


def _turbo_region(lib: ctypes.CDLL, img: EncodedImage, m: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop's region of the image decoded at the DCT scale ``m / 8``."""
    s = m / 8
    x0, y0, x1, y1 = _scaled_box(box, s, math.ceil(img.width * s), math.ceil(img.height * s))
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    msg = ctypes.create_string_buffer(_MSG)
    rc = lib.xnorpp_jpeg_decode_region(
        img.data, len(img.data), m, x0, y0, x1 - x0, y1 - y0, out.ctypes.data, msg, _MSG
    )
    if rc != 0:
        raise _load_error(img.path, RuntimeError(msg.value.decode(errors="replace")))
    return out


def _pil_region(
    img: EncodedImage, box: tuple[int, int, int, int], size: tuple[int, int], dct_scaling: bool
) -> np.ndarray:
    """The crop's region decoded by PIL (its ``draft`` mode: DCT scaling by 1/2, 1/4 or 1/8 for JPEGs)."""
    height, width = box[2:]
    try:
        with Image.open(io.BytesIO(img.data)) as image:
            if dct_scaling and image.format == "JPEG":  # the largest reduction keeping the crop >= size
                image.draft(
                    "RGB", (math.ceil(img.width * size[1] / width), math.ceil(img.height * size[0] / height))
                )
            rgb = np.asarray(image.convert("RGB"))
    except Exception as e:
        raise _load_error(img.path, e) from e
    s = 1 / round(img.width / rgb.shape[1])
    x0, y0, x1, y1 = _scaled_box(box, s, rgb.shape[1], rgb.shape[0])
    return rgb[y0:y1, x0:x1]


def _resize(pixels: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> Tensor:
    """``uint8`` ``H x W x 3`` resized to ``size``: bilinear with torch's ``uint8`` antialiased kernel
    (PIL's filter; within one level of PIL's result, a third of its time), other filters with PIL."""
    if resample != Image.Resampling.BILINEAR:
        image = Image.fromarray(np.ascontiguousarray(pixels))
        return torch.from_numpy(np.array(image.resize((size[1], size[0]), resample)))
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[
        None
    ]  # channels-last: the fast kernel
    out = F.interpolate(chw, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous()
