"""Binarization health: is a binary network still learning, or are its bits frozen?

Every ``every`` steps, per binary convolution (see README "Reading the health metrics"):

- ``flip``: fraction of binary weights whose sign changed since the previous measurement.
- ``frozen``: fraction of (centred) latent weights outside the estimator window ``|c| > 1``, which get
  no gradient and can never flip back by themselves.
- ``act_in_window``: fraction of the layer's inputs inside ``|x| <= 1`` (those that pass gradient),
  for layers with binary inputs.
- ``scale_mean`` / ``scale_std``: mean and spread of the scale factor Gamma (learned or XNOR alpha).

Means over layers are logged as ``health/<metric>``, per-layer values as ``health_layer/<layer>/<metric>``
(their own section of the dashboard), and histograms of Gamma and of the latent weights of the first
and last binary layer as ``hist/...``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import BinaryConv2d, LearnedScale, XnorScale

__all__ = ["BinarizationHealth"]

log = logging.getLogger(__name__)


class BinarizationHealth:
    """Collects the health metrics of every binary convolution of ``model``; cheap between measurements."""

    def __init__(self, model: nn.Module, every: int) -> None:
        self.every = int(every)
        self.layers: list[tuple[str, BinaryConv2d]] = [
            (name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.is_binary
        ]
        self.capture = False
        self._failures: set[str] = set()
        self._in_window: dict[str, float] = {}
        self._prev_signs: dict[str, Tensor] = {}
        self._hooks = [
            m.register_forward_pre_hook(self._hook(name)) for name, m in self.layers if m.binarize_inputs
        ]
        self._prev_signs = {name: self._signs(m) for name, m in self.layers if m.binarize_weights}

    def due(self, global_step: int) -> bool:
        """True when the step numbered ``global_step`` (0-based) should be measured."""
        return self.every > 0 and bool(self.layers) and (global_step + 1) % self.every == 0

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self.capture:
                with torch.no_grad():
                    self._in_window[name] = float((args[0].abs() <= 1).float().mean())

        return hook

    @staticmethod
    @torch.no_grad()
    def _signs(m: BinaryConv2d) -> Tensor:
        return m.scaled_weight_source().detach() >= 0

    @staticmethod
    @torch.no_grad()
    def _gamma(m: BinaryConv2d) -> Tensor | None:
        sf = m.scale_factor
        if isinstance(sf, LearnedScale):
            return sf.gamma_tensor().detach().flatten()
        if isinstance(sf, XnorScale):
            return m.scaled_weight_source().detach().abs().mean(dim=(1, 2, 3))
        return None

    def measure(self, histogram: Callable[[str, Tensor], Any] | None = None) -> dict[str, Any]:
        """:meth:`compute`, guarded: telemetry never stops training. A failure logs one warning (per
        kind of error) and gives an empty row."""
        try:
            return self.compute(histogram)
        except Exception as e:
            key = f"{type(e).__name__}: {e}"
            if key not in self._failures:
                self._failures.add(key)
                log.warning("binarization health could not be measured (%s); training continues", key)
            self._in_window.clear()
            return {}

    @torch.no_grad()
    def compute(self, histogram: Callable[[str, Tensor], Any] | None = None) -> dict[str, Any]:
        """Measure now. ``histogram(key, values)``, optional, makes the logged histogram of ``values``
        (``None``: nothing to log for that key)."""
        out: dict[str, Any] = {}
        sums: dict[str, list[float]] = {}

        def put(name: str, key: str, value: float) -> None:
            out[f"health_layer/{name}/{key}"] = value
            sums.setdefault(key, []).append(value)

        def put_hist(key: str, values: Tensor) -> None:
            if histogram is not None and (h := histogram(key, values)) is not None:
                out[key] = h

        binary_weight_layers = [(n, m) for n, m in self.layers if m.binarize_weights]
        for name, m in self.layers:
            if m.binarize_weights:
                c = m.scaled_weight_source().detach()
                signs = c >= 0
                put(name, "flip", float((signs != self._prev_signs[name]).float().mean()))
                put(name, "frozen", float((c.abs() > 1).float().mean()))
                self._prev_signs[name] = signs
            if name in self._in_window:
                put(name, "act_in_window", self._in_window[name])
            gamma = self._gamma(m)
            if gamma is not None:
                put(name, "scale_mean", float(gamma.mean()))
                put(name, "scale_std", float(gamma.std()) if gamma.numel() > 1 else 0.0)
                put_hist(f"hist/{name}/gamma", gamma)
        for key, values in sums.items():
            out[f"health/{key}"] = sum(values) / len(values)
        if binary_weight_layers:
            for name, m in {binary_weight_layers[0], binary_weight_layers[-1]}:
                put_hist(f"hist/{name}/latent_weight", m.scaled_weight_source().detach())
        self._in_window.clear()
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
