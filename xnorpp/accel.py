"""The switchboard of the speed code: every speed feature of a run is switched and reported here.

Each feature gives the same values as the plain PyTorch path; it only changes how fast a step runs:

- ``kernels``: ``compiled`` runs the binary layers' element-wise work as compiled loops (the sign and
  code by ``torch.compile``, :mod:`xnorpp.nn.kernels`; on CPU the C loops of :mod:`xnorpp.nn.native`)
  instead of ``eager`` PyTorch ops;
- ``int8_conv``: binary forward convs on CPU in fp32 as exact ``int8`` convs (:mod:`xnorpp.nn.int8_conv`);
- ``malloc``: the CPU allocator policy (:mod:`xnorpp.engine.memory`; applied, never undone: memory
  mapped under a policy keeps it);
- the warm-up that compiles the kernels before the first step (:func:`xnorpp.nn.fused.warm_up_fused`).

``with configure(trainer_cfg, device) as speed:`` applies a run's ``trainer.kernels``,
``trainer.int8_conv`` and ``trainer.malloc`` (a wrong value names the key and the valid choices),
``speed.warm_up(model, ...)`` compiles the kernels, ``speed.report()`` says what ran (for results.json),
and leaving the block restores the previous kernel and int8 switches. Nothing else in the package sets
them. Plain library use (``import xnorpp``, ``timm.create_model``, a loop of one's own) gets
:data:`LIBRARY_DEFAULTS` on import: the switches that are safe in any process (they fall back, with one
warning, where a compiler or the kernel is missing). The allocator policy is a whole-process decision,
left to the trainer and the benchmark.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .engine.memory import (
    MALLOC_POLICIES,
    allocator,
    jemalloc_loaded,
    malloc_in_use,
    preload_jemalloc,
    set_jemalloc_decay,
    set_malloc_policy,
    set_malloc_thresholds,
)
from .nn import int8_conv, kernels, native
from .nn.fused import has_fused, warm_up_fused

__all__ = [
    "KERNEL_MODES",
    "LIBRARY_DEFAULTS",
    "MALLOC_POLICIES",
    "Acceleration",
    "Settings",
    "apply_malloc",
    "configure",
    "describe_malloc",
    "follow_live_memory",
    "library_defaults",
    "preload_allocator",
    "preserved",
]

log = logging.getLogger("xnorpp")

KERNEL_MODES: tuple[str, ...] = kernels.KERNEL_MODES


@dataclass(frozen=True)
class Settings:
    """The speed switches of a run (``trainer.kernels``, ``trainer.int8_conv``, ``trainer.malloc``)."""

    kernels: str = "compiled"
    int8_conv: bool = True
    malloc: str = "auto"

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_MODES:
            raise ValueError(
                f"trainer.kernels: unknown kernel mode {self.kernels!r}; valid choices: {', '.join(KERNEL_MODES)}"
            )
        if not isinstance(self.int8_conv, bool):
            raise ValueError(f"trainer.int8_conv must be true or false, got {self.int8_conv!r}")
        if self.malloc not in MALLOC_POLICIES:
            raise ValueError(
                f"trainer.malloc: unknown malloc policy {self.malloc!r}; valid choices: {', '.join(MALLOC_POLICIES)}"
            )

    @classmethod
    def from_config(cls, trainer_cfg: Mapping[str, Any]) -> Settings:
        """The switches of a ``trainer`` config (any mapping; missing keys take the defaults)."""
        defaults = cls()
        return cls(
            kernels=str(trainer_cfg.get("kernels", defaults.kernels)),
            int8_conv=trainer_cfg.get("int8_conv", defaults.int8_conv),
            malloc=str(trainer_cfg.get("malloc", defaults.malloc)),
        )


# what plain library use gets on import: the trainer's defaults, less the process-wide allocator policy
LIBRARY_DEFAULTS = Settings(kernels="compiled", int8_conv=True, malloc="system")


class Acceleration(contextlib.AbstractContextManager["Acceleration"]):
    """The speed features of one run on ``device``: applied on entry, kernel and int8 switches restored on
    exit; :meth:`report` says what ran in between."""

    def __init__(self, settings: Settings, device: torch.device | str = "cpu") -> None:
        self.settings, self.device = settings, torch.device(device)
        self._previous: tuple[str, bool] | None = None
        self._calls = (0, 0)

    def __enter__(self) -> Acceleration:
        self._previous = (kernels.kernel_mode(), int8_conv.int8_conv_enabled())
        if self.device.type == "cpu":  # before the big allocations: the policy applies to memory mapped later
            try:
                set_malloc_policy(self.settings.malloc)
            except ValueError as e:
                raise ValueError(f"trainer.malloc: {e}") from None
        kernels.set_kernels(self.settings.kernels)  # a compile that failed in an earlier run is tried again
        int8_conv.set_int8_conv(self.settings.int8_conv)
        self._calls = (int8_conv.int8_conv_calls(), native.calls())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            kernels.set_kernels(self._previous[0])
            int8_conv.set_int8_conv(self._previous[1])
            self._previous = None

    def warm_up(
        self, model: nn.Module, autocast_dtype: torch.dtype | None = None, compiled: bool = False
    ) -> bool:
        """Compile the binary layers' kernels now, on CPU, unless the whole model is ``compiled``: no compile
        in the first step, and no compiler memory amid its activations. True if it ran."""
        if self.device.type != "cpu" or compiled or not has_fused(model):
            return False
        warm_up_fused(self.device, autocast_dtype)
        return True

    def report(self) -> dict[str, Any]:
        """What ran since entry, for results.json: ``kernels`` (``eager`` if compiling failed), ``int8_conv``
        (binary forward convs ran as int8 convs), ``c_kernels`` (element-wise work ran in the C loops),
        ``malloc`` (the policy applied, ``auto`` resolved; ``None`` off CPU) and ``allocator``."""
        int8_calls, c_calls = self._calls
        return {
            "kernels": kernels.get_kernels(),
            "int8_conv": int8_conv.int8_conv_calls() > int8_calls,
            "c_kernels": native.calls() > c_calls,
            "malloc": malloc_in_use(self.settings.malloc) if self.device.type == "cpu" else None,
            "allocator": allocator(),
        }


def configure(trainer_cfg: Mapping[str, Any] | Settings, device: torch.device | str = "cpu") -> Acceleration:
    """The speed features a ``trainer`` config (or :class:`Settings`) asks for, as a context manager."""
    settings = trainer_cfg if isinstance(trainer_cfg, Settings) else Settings.from_config(trainer_cfg)
    return Acceleration(settings, device)


def preserved() -> Acceleration:
    """A context that changes nothing on entry and restores the kernel and int8 switches as they are now."""
    return Acceleration(Settings(kernels.kernel_mode(), int8_conv.int8_conv_enabled(), "system"))


def library_defaults() -> None:
    """Switch on :data:`LIBRARY_DEFAULTS` (``import xnorpp`` does; a run's :func:`configure` overrides them)."""
    kernels.set_kernels(LIBRARY_DEFAULTS.kernels)
    int8_conv.set_int8_conv(LIBRARY_DEFAULTS.int8_conv)


def apply_malloc(policy: str) -> dict[str, str]:
    """Apply the allocator ``policy`` to this process (``jemalloc`` where it is not loaded: a ``ValueError``
    naming the preload command); returns the policy it amounts to and the allocator, as :meth:`report`."""
    set_malloc_policy(policy)
    return describe_malloc(policy)


def describe_malloc(policy: str) -> dict[str, str]:
    """What the allocator ``policy`` amounts to in this process (``auto`` resolved) and the allocator."""
    return {"malloc": malloc_in_use(policy), "allocator": allocator()}


def preload_allocator(entry: str, keep_glibc: Callable[[], bool] = lambda: False) -> None:
    """Run this command-line ``entry`` again with jemalloc preloaded (:func:`xnorpp.engine.memory.preload_jemalloc`);
    ``train.py`` loads that function without importing the package, the benchmark calls it here."""
    preload_jemalloc(entry, keep_glibc)


def follow_live_memory(threshold: int = 64 * 2**10) -> bool:
    """For measuring memory: make this process's resident set follow the memory it holds (jemalloc: freed
    pages go back at once; glibc: blocks from ``threshold`` bytes get their own ``mmap`` and freed memory
    goes back). False where neither applies."""
    if jemalloc_loaded():
        return set_jemalloc_decay(0)
    return set_malloc_thresholds(threshold, threshold)
