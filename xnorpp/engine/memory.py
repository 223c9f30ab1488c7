"""CPU memory allocator policy for training (glibc ``malloc``).

A training step allocates and frees the same large activation buffers every step. With glibc's
defaults every block above the dynamic ``mmap`` threshold (at most 32 MiB) is a fresh ``mmap``: each
use of it faults in every page again, and freed heap above 128 KiB is handed back to the OS. On a
ResNet-18 step at 32x32, batch 128, the page faults of a 32 MiB activation made an element-wise op
~10x slower than on reused memory (13 ms instead of 1.3 ms), and the whole step ~25% slower.

``keep``: blocks of any size come from the heap and freed memory is kept for reuse (``mallopt``
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` at their maximum), as a caching allocator does: the
resident set grows to the step's high-water mark and stays there. glibc's heap then fragments: the
binary ResNet-18's peak RSS at 32x32 is ~2x the memory it holds. ``system``: glibc's defaults.

``jemalloc``: jemalloc (``libjemalloc2``), preloaded when the process starts
(``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python train.py trainer.malloc=jemalloc``),
set never to hand freed pages back (``dirty_decay_ms``/``muzzy_decay_ms`` = -1, through ``mallctl``):
as fast as ``keep`` and its size classes do not fragment - measured peak RSS 0.91 / 0.88 GB for the floor
and the binary net at 32x32, batch 128, against 1.2 / 1.5 GB under glibc ``keep``. A process cannot
switch its allocator once running, so without the preload this policy is an error that names the
command. Under a preloaded jemalloc, ``keep`` means the same as ``jemalloc``.

``auto`` (the default): ``jemalloc`` where it is loaded, else ``keep``. The command-line entry points
(``python train.py``, ``python -m xnorpp.bench``) preload it themselves: :func:`preload_jemalloc` runs the
same command again, in the same process (``exec``, same pid), with jemalloc in ``LD_PRELOAD``, where
jemalloc is installed - only when the process was started as that entry point, never inside an
interactive interpreter, a notebook or a debugger. ``XNORPP_JEMALLOC=0`` (or a configured ``keep`` or
``system``, or a preload of another allocator) stays as is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
from collections.abc import Callable

__all__ = [
    "JEMALLOC_DIRS",
    "MALLOC_POLICIES",
    "PRELOAD_ENV",
    "allocator",
    "find_jemalloc",
    "jemalloc_loaded",
    "malloc_in_use",
    "preload_jemalloc",
    "set_jemalloc_decay",
    "set_malloc_policy",
    "set_malloc_thresholds",
    "started_as",
]

MALLOC_POLICIES: tuple[str, ...] = ("auto", "keep", "system", "jemalloc")
PRELOAD_ENV = "XNORPP_JEMALLOC"  # "0": the entry points do not preload jemalloc
_RERUN_ENV = "_XNORPP_JEMALLOC_RERUN"  # set for the re-run, which removes it: never exec twice
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "tbbmalloc", "hoard")  # a preload of one: leave it
JEMALLOC_DIRS: tuple[str, ...] = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                                  "/usr/local/lib")  # fmt: skip
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_KEEP = 2**31 - 1  # the largest value mallopt takes (an int)
log = logging.getLogger(__name__)


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc ``mallopt``: blocks from ``mmap_threshold`` bytes get their own ``mmap``; free heap above
    ``trim_threshold`` goes back to the OS. True if both took effect (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


def jemalloc_loaded() -> bool:
    """Whether jemalloc is this process's ``malloc`` (preloaded): its library is mapped."""
    try:
        with open("/proc/self/maps") as f:
            return "libjemalloc" in f.read()
    except OSError:
        return False


def find_jemalloc() -> str | None:
    """Path of an installed ``libjemalloc.so*`` (for ``LD_PRELOAD``), or ``None``."""
    for d in JEMALLOC_DIRS:
        found = sorted(glob.glob(f"{d}/libjemalloc.so*"))
        if found:
            return found[0]
    return None


def set_jemalloc_decay(ms: int) -> bool:
    """jemalloc: hand freed pages back after ``ms`` milliseconds (``-1``: never, ``0``: at once), for
    the arenas in use and those created later. True if jemalloc took it."""
    if not jemalloc_loaded():
        return False
    mallctl = ctypes.CDLL(None).mallctl
    value, narenas, size = (
        ctypes.c_ssize_t(ms),
        ctypes.c_uint(0),
        ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint)),
    )
    if mallctl(b"arenas.narenas", ctypes.byref(narenas), ctypes.byref(size), None, 0) != 0:
        return False
    ok = True
    for key in ("dirty_decay_ms", "muzzy_decay_ms"):
        ok &= mallctl(f"arenas.{key}".encode(), None, None, ctypes.byref(value), ctypes.sizeof(value)) == 0
        for i in range(narenas.value):  # arenas not yet created answer EFAULT and take the default above
            mallctl(f"arena.{i}.{key}".encode(), None, None, ctypes.byref(value), ctypes.sizeof(value))
    return ok


def _jemalloc_missing() -> str:
    path = find_jemalloc()
    how = (
        f"start the process with LD_PRELOAD={path} (e.g. LD_PRELOAD={path} python train.py trainer.malloc=jemalloc)"
        if path
        else "install jemalloc (Debian/Ubuntu: apt-get install libjemalloc2; looked in "
        f"{', '.join(JEMALLOC_DIRS)}) and start the process with LD_PRELOAD=<path to libjemalloc.so.2>"
    )
    return (
        f"malloc policy 'jemalloc' needs jemalloc loaded when the process starts: {how}; or use malloc 'auto' "
        "(jemalloc where loaded, else glibc's keep)"
    )


def _program(orig_argv: list[str]) -> tuple[str, str] | None:
    """What a ``python`` command line runs: ``("script", path)``, ``("module", name)``, ``("command", code)``
    or ``None`` (an interactive interpreter, a program on stdin), after the interpreter's options."""
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        if arg == "--check-hash-based-pycs":
            i += 2
            continue
        if arg == "-":
            return None
        if not arg.startswith("-"):
            return "script", arg
        if not arg.startswith("--"):
            for j, flag in enumerate(arg[1:], start=2):  # bundled flags: -uB, -Wignore, -mpdb
                if flag in "cmWX":
                    attached = arg[j:]
                    value = attached or (orig_argv[i + 1] if i + 1 < len(orig_argv) else "")
                    if flag in "cm":
                        return ("module" if flag == "m" else "command"), value
                    i += 0 if attached else 1
                    break
        i += 1
    return None


def started_as(entry: str) -> bool:
    """Whether this process was started as the command-line program ``entry`` (a script's path, or a
    module's name as in ``python -m``), not in an interactive interpreter (``python -i``, a REPL, a
    notebook's ``%run``), a debugger (``python -m pdb``, a trace function) or another program."""
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12: debuggers may use it instead of a trace
    if (
        sys.flags.interactive
        or hasattr(sys, "ps1")
        or sys.gettrace() is not None
        or (monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None)
    ):
        return False
    program = _program(list(getattr(sys, "orig_argv", [])))
    if program is None:
        return False
    kind, value = program
    if kind == "script":
        return os.path.realpath(value) == os.path.realpath(entry)
    return kind == "module" and value == entry


def preload_jemalloc(entry: str, keep_glibc: Callable[[], bool] = lambda: False) -> None:
    """Run this process's command again with jemalloc preloaded, where it is installed and not loaded.

    ``os.execve`` of ``sys.executable`` with ``sys.orig_argv`` (interpreter options and ``-m`` kept),
    the same environment plus ``LD_PRELOAD``: the pid stays, so ``torchrun`` and job schedulers follow
    it, and child processes start on jemalloc too, as with a preload typed on the command line. Call it
    as early as possible in a command-line entry point (what ran before it runs again), with ``entry``
    its script's path or module name (:func:`started_as`). Does nothing unless the process was started
    as ``entry`` on Linux, with ``XNORPP_JEMALLOC=0`` (or ``false``, ``no``, ``off``), when jemalloc is
    loaded or not installed, when ``LD_PRELOAD`` already names another allocator, when ``keep_glibc()``
    (asked last: it may read the config) or in the re-run (if its preload did not load, it goes on with
    glibc).
    """
    if os.environ.pop(_RERUN_ENV, None) is not None:  # this is the re-run
        return
    preloaded = os.environ.get("LD_PRELOAD", "")
    if (
        not sys.platform.startswith("linux")
        or os.environ.get(PRELOAD_ENV, "1").strip().lower() in ("0", "false", "no", "off")
        or jemalloc_loaded()
        or any(name in preloaded for name in _ALLOCATORS)
        or not started_as(entry)
    ):
        return
    path = find_jemalloc()
    if path is None or keep_glibc():
        return
    env = {**os.environ, "LD_PRELOAD": f"{path}:{preloaded}" if preloaded else path, _RERUN_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except (OSError, ValueError) as e:  # the interpreter cannot be re-run (frozen, embedded): stay on glibc
        log.warning("could not re-run with jemalloc preloaded (%s); using glibc's malloc", e)


def allocator() -> str:
    """The ``malloc`` of this process: ``jemalloc`` (preloaded) or ``glibc`` (Linux), else ``system``."""
    if jemalloc_loaded():
        return "jemalloc"
    return "glibc" if sys.platform.startswith("linux") else "system"


def malloc_in_use(policy: str) -> str:
    """The policy ``policy`` amounts to: ``auto`` is ``jemalloc`` where jemalloc is loaded, else ``keep``."""
    if policy == "auto":
        return "jemalloc" if jemalloc_loaded() else "keep"
    return policy


def set_malloc_policy(policy: str) -> bool:
    """Apply ``policy`` (one of :data:`MALLOC_POLICIES`) to this process; True if it took effect.

    ``auto`` is ``jemalloc`` if jemalloc is loaded, else ``keep``. ``keep`` needs glibc (Linux); elsewhere it logs that it does nothing and returns False.
    ``system`` changes nothing (a process cannot restore glibc's dynamic threshold) and returns True.
    Call it before the large allocations: memory already mapped keeps its old policy.
    """
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"unknown malloc policy {policy!r}; valid choices: {', '.join(MALLOC_POLICIES)}")
    if policy == "system":
        return True
    if jemalloc_loaded():  # auto, keep and jemalloc: never hand freed pages back
        return set_jemalloc_decay(-1)
    if policy == "jemalloc":
        raise ValueError(_jemalloc_missing())
    ok = set_malloc_thresholds(_KEEP, _KEEP)
    if not ok:
        log.info("malloc policy 'keep' needs glibc's mallopt; not available here, using the system's")
    return ok
