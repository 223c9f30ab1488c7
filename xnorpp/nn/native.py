"""C kernels for the fused binary convolution on CPU, built with the system's C compiler at first use.

PyTorch runs an element-wise op that mixes an ``int8`` (or ``int16``) operand with floats on CPU as a
cast to a new float tensor followed by the float op, and each of the fused node's epilogues takes two
to four such passes over an activation. ``torch.compile``'s C++ code for ``int8`` inputs measured
2-7x slower than the eager ops (its ``int8`` vector loads are partial loads). The loops of
``csrc/binary_kernels.c`` do each of these jobs in one pass, with the same fp32 arithmetic
(bit-identical results):

- :func:`sign_code_u8`: the ``int8`` conv's ``uint8`` operand, written channels-last as oneDNN reads
  it (else it copies it), and the saved ``int8`` code, from an NCHW input;
- :func:`code_sign`: the ``+-1`` input of the weight gradient from the saved ``int8`` codes;
- :func:`masked_grad_`: the STE window applied to the input gradient, in place;
- :func:`gamma_backward`: ``grad * y`` (summed to ``dGamma``) and ``grad * Gamma`` from the ``int16`` y;
- :func:`gamma_forward`: the ``int8`` conv's channels-last result times ``Gamma`` and as ``int16``,
  written in the layout the network runs in.

The library is built once per source, compiler, flags, CPU and C library (``-O3 -march=native -fopenmp``,
~1 s) into ``$XNORPP_CACHE_DIR`` (default ``~/.cache/xnorpp``; written under a temporary name and renamed,
so processes building at once, e.g. torchrun's ranks, never load a partial file) and loaded with
``ctypes``. Its OpenMP runtime is the one PyTorch has loaded where both are GNU ``libgomp.so.1`` (PyTorch's
Linux wheels); with another runtime in PyTorch both thread pools would coexist (correct, maybe
slower). :func:`available` says whether it works, :func:`unavailable_reason` why not (no compiler, a
failed build): callers then use the PyTorch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SOURCE",
    "available",
    "cache_dir",
    "calls",
    "code_sign",
    "compiler_flags",
    "compiler_hint",
    "dense",
    "gamma_backward",
    "gamma_forward",
    "library_path",
    "masked_grad_",
    "same_memory_order",
    "sign_code_u8",
    "unavailable_reason",
]

SOURCE = Path(__file__).with_name("csrc") / "binary_kernels.c"
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")


def compiler_flags() -> list[str]:
    """The build's flags: ours, then ``$XNORPP_CFLAGS`` (e.g. ``-march=x86-64-v2`` for a library that runs on
    every node of a cluster sharing one cache, or ``-mno-avx2`` to get the portable loops)."""
    return [*_FLAGS, *shlex.split(os.environ.get("XNORPP_CFLAGS", ""))]


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES: dict[str, list[type]] = {
    "xnorpp_code_sign_f32": [_P, _P, _I64, _INT],
    "xnorpp_masked_grad_f32": [_P, _P, _I64, _INT],
    "xnorpp_gamma_backward_f32": [_P, _P, _P, _P, _P, _I64, _I64, _INT],
    "xnorpp_gamma_forward_nhwc_to_nchw_f32": [_P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "xnorpp_gamma_forward_f32": [_P, _P, _P, _P, _I64, _I64, _INT],
    "xnorpp_sign_code_u8_nchw_to_nhwc": [_P, _P, _P, _I64, _I64, _I64, _INT],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False
_calls = 0  # kernel calls in this process


def cache_dir() -> Path:
    """Where libraries are built: ``$XNORPP_CACHE_DIR``, else ``$XDG_CACHE_HOME/xnorpp`` or
    ``~/.cache/xnorpp``."""
    if os.environ.get("XNORPP_CACHE_DIR"):
        return Path(os.environ["XNORPP_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "xnorpp"
    home = os.path.expanduser("~")
    if home == "~":  # no home directory (no HOME, no passwd entry)
        return Path(tempfile.gettempdir()) / f"xnorpp-{os.getuid()}"
    return Path(home) / ".cache" / "xnorpp"


def compiler_hint() -> str:
    """How to get the C/C++ compiler the kernels and ``torch.compile`` use on this platform."""
    system = platform.system()
    if system == "Darwin":
        return "install Apple's command line tools (xcode-select --install)"
    if system == "Windows":
        return "install the Visual Studio Build Tools (MSVC) and run from their developer prompt"
    return "install gcc (Debian/Ubuntu: apt-get install gcc) or set CC"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "") or "cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code runs only on such CPUs): part of the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.strip().splitlines() or [""])[0]


def library_path(compiler: str) -> Path:
    """The cached library for this source, compiler (path and version), flags, CPU and C library."""
    key = hashlib.sha256()
    parts = (
        SOURCE.read_bytes(),
        compiler,
        _compiler_version(compiler),
        " ".join(compiler_flags()),
        _cpu_flags(),
    )
    for part in (*parts, " ".join(platform.libc_ver())):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / f"binary_kernels-{key.hexdigest()[:16]}.so"


def build_library(
    command: Callable[[str], list[str]], target: Path, hint: Callable[[str], str] | None = None
) -> None:
    """Run the compiler ``command(output_path)`` to build the shared library ``target``: written under a
    temporary name, then renamed (processes building at once never load a partial file). A failure
    raises ``RuntimeError`` with the compiler's first line of errors and ``hint(stderr)``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = command(tmp)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{cmd[0]} failed ({first}){hint(proc.stderr) if hint else ''}")
        os.chmod(tmp, 0o755)  # mkstemp made it private: a shared cache serves every user
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` to ``target`` (:func:`build_library`)."""
    build_library(lambda out: [compiler, *compiler_flags(), str(SOURCE), "-o", out], target)


def _load() -> ctypes.CDLL:
    if platform.system() != "Linux":
        raise RuntimeError(f"they are built on Linux only, this is {platform.system()}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler found: {compiler_hint()}")
    path = library_path(compiler)
    if not path.exists():
        _build(compiler, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged cached file: build it again, once
        _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _load()
                except Exception as e:  # no compiler, a failed build, an unloadable library
                    first = (str(e).strip().splitlines() or [""])[0]
                    _reason = f"{type(e).__name__}: {first}"
                _tried = True
    return _lib


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the C kernels cannot be used, or ``None`` (after :func:`available`)."""
    return _reason


def calls() -> int:
    """How many C kernel calls this process has made (to tell whether a run used them)."""
    return _calls


def _lib_or_raise() -> ctypes.CDLL:
    global _calls
    lib = _library()
    if lib is None:
        raise RuntimeError(f"xnorpp's C kernels are unavailable: {_reason}")
    _calls += 1
    return lib


def _check(t: Tensor, dtype: torch.dtype, name: str) -> None:
    if t.device.type != "cpu" or t.dtype != dtype:
        raise ValueError(f"{name} must be a CPU {dtype} tensor, got {t.dtype} on {t.device}")


def dense(t: Tensor, memory_format: torch.memory_format | None = None) -> bool:
    """Dense in ``memory_format``, or (``None``) contiguous or channels-last."""
    if memory_format is not None:
        return t.is_contiguous(memory_format=memory_format)
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def same_memory_order(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides along every dim longer than 1 (the others never move in memory)."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1
    )


def code_sign(code: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``clamp(code.float(), -1, 1)`` in fp32 for an ``int8`` code dense in ``memory_format``."""
    _check(code, torch.int8, "code")
    if not dense(code, memory_format):
        raise ValueError("code must be dense in the given memory format")
    out = torch.empty_like(code, dtype=torch.float32, memory_format=memory_format)
    _lib_or_raise().xnorpp_code_sign_f32(
        code.data_ptr(), out.data_ptr(), code.numel(), torch.get_num_threads()
    )
    return out


def masked_grad_(grad: Tensor, code: Tensor) -> Tensor:
    """``grad *= (|code| >> 1)`` in place (fp32 ``grad``, ``int8`` code, one shape and memory order)."""
    _check(grad, torch.float32, "grad")
    _check(code, torch.int8, "code")
    if not same_memory_order(grad, code) or not dense(grad):
        raise ValueError("grad and code must have one shape and one dense memory order")
    _lib_or_raise().xnorpp_masked_grad_f32(
        grad.data_ptr(), code.data_ptr(), grad.numel(), torch.get_num_threads()
    )
    return grad


def gamma_backward(grad: Tensor, y: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad * y, grad * gamma)`` for fp32 ``grad`` (N, ...), ``int16`` ``y`` in ``grad``'s memory order and
    ``gamma`` one sample's worth laid out as ``grad[0]`` (expanded, dense)."""
    _check(grad, torch.float32, "grad")
    _check(y, torch.int16, "y")
    _check(gamma, torch.float32, "gamma")
    if not same_memory_order(grad, y) or not dense(grad):
        raise ValueError("grad and y must have one shape and one dense memory order")
    if grad.dim() < 1 or not same_memory_order(gamma, grad[0]):
        raise ValueError("gamma must be laid out as one sample of grad")
    prod, scaled = torch.empty_like(grad), torch.empty_like(grad)
    rows = grad.shape[0]
    _lib_or_raise().xnorpp_gamma_backward_f32(
        grad.data_ptr(), y.data_ptr(), gamma.data_ptr(), prod.data_ptr(), scaled.data_ptr(),
        rows, grad.numel() // max(rows, 1), torch.get_num_threads(),
    )  # fmt: skip
    return prod, scaled


def gamma_forward(y: Tensor, gamma: Tensor, memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
    """``(y * gamma, y as int16)`` in ``memory_format`` for a channels-last fp32 ``y`` (N, C, H, W) holding
    integers and ``gamma`` (C, H, W); for a channels-last result the product is written into ``y``."""
    _check(y, torch.float32, "y")
    _check(gamma, torch.float32, "gamma")
    if y.dim() != 4 or not dense(y, torch.channels_last):
        raise ValueError("y must be a 4-d channels-last tensor")
    n, c, h, w = y.shape
    if tuple(gamma.shape) != (c, h, w):
        raise ValueError(f"gamma must have shape {(c, h, w)}, got {tuple(gamma.shape)}")
    y16 = torch.empty_like(y, dtype=torch.int16, memory_format=memory_format)
    lib, nt = _lib_or_raise(), torch.get_num_threads()
    if memory_format == torch.channels_last:  # no layout change: the product is written into y
        g = gamma.permute(1, 2, 0).contiguous()
        lib.xnorpp_gamma_forward_f32(
            y.data_ptr(), g.data_ptr(), y.data_ptr(), y16.data_ptr(), n, c * h * w, nt
        )
        return y, y16
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    g = gamma.contiguous()
    lib.xnorpp_gamma_forward_nhwc_to_nchw_f32(
        y.data_ptr(), g.data_ptr(), out.data_ptr(), y16.data_ptr(), n, c, h * w, nt
    )
    return out, y16


def sign_code_u8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(sign(x) + 1 as uint8, code)`` as :func:`xnorpp.nn.kernels.sign_code_u8` for a contiguous (NCHW)
    fp32 ``x``, with the ``uint8`` operand in channels-last memory order (the code in ``x``'s)."""
    _check(x, torch.float32, "x")
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError("x must be a contiguous (NCHW) 4-d tensor")
    n, c, h, w = x.shape
    u = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.channels_last)
    code = torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format)
    _lib_or_raise().xnorpp_sign_code_u8_nchw_to_nhwc(
        x.data_ptr(), u.data_ptr(), code.data_ptr(), n, c, h * w, torch.get_num_threads()
    )
    return u, code
