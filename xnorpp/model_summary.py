"""Model summary: parameters and memory by precision, binary and float operations per image.

One forward pass (a zero image, batch 1, eval mode, no grad) with hooks on every layer that holds parameters. Per
layer it records the weight and input precision, the output shape, the parameters split into binary
(latent weights of a convolution with ``binarize_weights=True``, stored at 1 bit) and real (everything
else: scale factors, BN, biases, real layers; 32 bits), and the multiply-accumulates (MACs):

- convolution: ``MACs = C_in/groups * kh * kw * C_out * H_out * W_out`` per image;
- linear: ``MACs = in_features * out_features`` per row.

MACs of a convolution whose weights AND inputs are binary are binary operations (``bops``, XNOR +
popcount); all other convolution and linear MACs are float operations (``flops``). Elementwise work
(BN, ReLU, pooling, scale factors) is not counted, as in Bi-Real Net and ReActNet, whose convention
``ops = flops + bops / 64`` is reported too.

Command line: ``python -m xnorpp.model_summary --model resnet18_preact_bin --binarization full_binary
--scale rank1 --input-size 224 --num-classes 1000``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["LayerSummary", "ModelSummary", "main", "summary"]

REAL_BITS = 32
BINARY_BITS = 1
BOPS_PER_OP = 64  # Bi-Real / ReActNet: one 64-bit XNOR-popcount word counts as one float op


@dataclass
class LayerSummary:
    """One layer with parameters: precision, shape, parameter count, memory and operations per image."""

    name: str
    type: str
    weight_bits: int
    input_bits: int
    output_shape: tuple[int, ...] | None
    params_binary: int
    params_real: int
    bops: int
    flops: int

    @property
    def params_total(self) -> int:
        return self.params_binary + self.params_real

    @property
    def memory_bytes(self) -> float:
        """``params_binary / 8 + 4 * params_real`` bytes."""
        return self.params_binary * BINARY_BITS / 8 + self.params_real * REAL_BITS / 8

    def as_dict(self) -> dict[str, Any]:
        """Plain values (the output shape as ``"CxHxW"``), e.g. for a wandb table row."""
        return {
            "name": self.name,
            "type": self.type,
            "weight_bits": self.weight_bits,
            "input_bits": self.input_bits,
            "output_shape": _shape_str(self.output_shape),
            "params_binary": self.params_binary,
            "params_real": self.params_real,
            "params_total": self.params_total,
            "memory_bytes": self.memory_bytes,
            "bops": self.bops,
            "flops": self.flops,
        }


@dataclass
class ModelSummary:
    """Per-layer rows and model totals; ``compression = memory_fp32_bytes / memory_bytes``."""

    layers: list[LayerSummary] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()

    @property
    def params_binary(self) -> int:
        return sum(layer.params_binary for layer in self.layers)

    @property
    def params_real(self) -> int:
        return sum(layer.params_real for layer in self.layers)

    @property
    def params_total(self) -> int:
        return self.params_binary + self.params_real

    @property
    def memory_bytes(self) -> float:
        """Binary parameters at 1 bit, real ones at 32 bits."""
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def memory_fp32_bytes(self) -> float:
        """The same parameters all stored at 32 bits: ``4 * params_total``."""
        return float(self.params_total * REAL_BITS // 8)

    @property
    def compression(self) -> float:
        """``memory_fp32_bytes / memory_bytes`` (1.0 for a model without parameters)."""
        return self.memory_fp32_bytes / self.memory_bytes if self.memory_bytes else 1.0

    @property
    def bops(self) -> int:
        return sum(layer.bops for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def ops(self) -> float:
        """``flops + bops / 64`` (Bi-Real Net / ReActNet convention)."""
        return self.flops + self.bops / BOPS_PER_OP

    def to_dict(self) -> dict[str, Any]:
        """The totals as a plain, JSON-serialisable dict."""
        return {
            "input_shape": list(self.input_shape),
            "params_binary": self.params_binary,
            "params_real": self.params_real,
            "params_total": self.params_total,
            "memory_bytes": self.memory_bytes,
            "memory_fp32_bytes": self.memory_fp32_bytes,
            "compression": self.compression,
            "bops": self.bops,
            "flops": self.flops,
            "ops": self.ops,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer (see :meth:`LayerSummary.as_dict`)."""
        return [layer.as_dict() for layer in self.layers]

    def table(self) -> str:
        """Fixed-width text table, one line per layer, with a totals footer."""
        header = ("layer", "type", "W", "A", "output", "binary", "real", "memory", "BOPs", "FLOPs")
        body = [
            (
                layer.name or "(model)",
                layer.type,
                str(layer.weight_bits),
                str(layer.input_bits),
                _shape_str(layer.output_shape),
                _human(layer.params_binary),
                _human(layer.params_real),
                _human_bytes(layer.memory_bytes),
                _human(layer.bops),
                _human(layer.flops),
            )
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        left = {0, 1, 4}

        def fmt(row: Sequence[str]) -> str:
            cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(["x" * w for w in widths]))
        lines = [fmt(header), rule, *(fmt(row) for row in body), rule]
        lines += [
            f"input: {_shape_str(self.input_shape)}  (W / A: weight / input bits)",
            f"params: {_human(self.params_total)} total = {_human(self.params_binary)} binary "
            f"({self.params_binary:,}) + {_human(self.params_real)} real ({self.params_real:,})",
            f"memory: {_human_bytes(self.memory_bytes)} (fp32: {_human_bytes(self.memory_fp32_bytes)}, "
            f"compression {self.compression:.2f}x)",
            f"BOPs: {_human(self.bops)}  FLOPs: {_human(self.flops)}  "
            f"OPs = FLOPs + BOPs/{BOPS_PER_OP}: {_human(self.ops)}",
        ]
        return "\n".join(lines)


def _shape_str(shape: Sequence[int] | None) -> str:
    return "x".join(str(s) for s in shape) if shape is not None else "-"


def _human(n: float) -> str:
    """Three significant digits with a K/M/G/T suffix: ``11157504 -> "11.2M"``."""
    if n == 0:
        return "0"
    rounded = float(f"{n:.3g}")
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(rounded) >= threshold:
            return f"{rounded / threshold:.3g}{suffix}"
    return f"{rounded:.3g}"


def _human_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes): ``1394688 -> "1.39MB"``."""
    return f"{_human(n)}B"


def _input_shape(
    model: nn.Module, input_size: int | Sequence[int] | None, in_chans: int | None
) -> tuple[int, int, int]:
    """``(C, H, W)`` from an int, ``(H, W)`` or ``(C, H, W)``; defaults from ``model.input_size``/``in_chans``."""
    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise ValueError("input_size is required for a model without an input_size attribute")
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        if in_chans is not None and in_chans != size[0]:
            raise ValueError(f"in_chans={in_chans} contradicts input_size={size}")
        return size  # type: ignore[return-value]
    if len(size) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    chans = in_chans if in_chans is not None else int(getattr(model, "in_chans", 3))
    return (chans, size[0], size[1])


def _units(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Parameter]]]:
    """Layers that own parameters: convolutions and linears with all their parameters (a binary conv's
    scale factor included), and any other module with its direct parameters. Shared ones count once."""
    units: list[tuple[str, nn.Module, list[nn.Parameter]]] = []
    seen: set[int] = set()
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (_ConvNd, nn.Linear)):
            params = list(module.parameters())
            inside.append(f"{name}." if name else "")  # the root's descendants: every name
        else:
            params = list(module.parameters(recurse=False))
        params = [p for p in params if id(p) not in seen]
        if params or isinstance(module, (_ConvNd, nn.Linear)):
            seen.update(id(p) for p in params)
            units.append((name, module, params))
    return units


def _macs(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> int:
    """Multiply-accumulates of one call, per image (``output`` and ``inputs`` carry a batch dim)."""
    if isinstance(module, _ConvNd):
        spatial = inputs[0].shape[2:] if module.transposed else output.shape[2:]
        return module.weight.numel() * math.prod(spatial)
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features * (output[0].numel() // module.out_features)
    return 0


@torch.no_grad()
def summary(
    model: nn.Module,
    input_size: int | tuple[int, int] | tuple[int, int, int] | None = None,
    in_chans: int | None = None,
) -> ModelSummary:
    """Summarise ``model`` with one forward of a zero ``(1, C, H, W)`` image in eval mode, no grad.

    ``input_size`` is ``S`` (square), ``(H, W)`` or ``(C, H, W)``; ``C`` defaults to ``in_chans``, then
    to ``model.in_chans``, then to 3. Every module's training flag is restored afterwards.
    """
    shape = _input_shape(model, input_size, in_chans)
    units = _units(model)
    macs: dict[str, int] = {name: 0 for name, _, _ in units}
    out_shapes: dict[str, tuple[int, ...] | None] = {name: None for name, _, _ in units}

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
                output = output[0]
            if isinstance(output, Tensor):
                out_shapes[name] = tuple(output.shape[1:])
                macs[name] += _macs(module, inputs, output)

        return hook

    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    modes = {m: m.training for m in model.modules()}
    handles = [module.register_forward_hook(hook_for(name)) for name, module, _ in units]
    try:
        model.eval()
        model(torch.zeros(1, *shape, device=device, dtype=dtype))  # zeros: the RNG stream is untouched
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode

    layers = []
    for name, module, params in units:
        w_bin = bool(getattr(module, "binarize_weights", False))
        a_bin = bool(getattr(module, "binarize_inputs", False))
        weight = getattr(module, "weight", None) if w_bin else None
        n_binary = sum(p.numel() for p in params if p is weight)
        n_real = sum(p.numel() for p in params if p is not weight)
        ops = macs[name]
        layers.append(
            LayerSummary(
                name=name,
                type=type(module).__name__,
                weight_bits=BINARY_BITS if w_bin else REAL_BITS,
                input_bits=BINARY_BITS if a_bin else REAL_BITS,
                output_shape=out_shapes[name],
                params_binary=n_binary,
                params_real=n_real,
                bops=ops if (w_bin and a_bin) else 0,
                flops=0 if (w_bin and a_bin) else ops,
            )
        )
    return ModelSummary(layers=layers, input_shape=shape)


def main(argv: Sequence[str] | None = None) -> ModelSummary:
    """Build a timm model (xnorpp's registered ones included) and print its summary table."""
    import timm

    from . import models  # importing registers the binary ResNets with timm
    from .nn import SCALES

    parser = argparse.ArgumentParser(prog="python -m xnorpp.model_summary", description=main.__doc__)
    parser.add_argument("--model", default="resnet18_preact_bin", help="timm model name")
    parser.add_argument("--binarization", choices=list(models.BINARIZATIONS), default=None)
    parser.add_argument("--scale", choices=list(SCALES), default=None)
    parser.add_argument("--stem", choices=list(models.STEMS), default=None)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)

    kwargs: dict[str, Any] = {"num_classes": args.num_classes, "in_chans": args.in_chans}
    for key in ("binarization", "scale", "stem"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    entry = timm.models.model_entrypoint(args.model)
    if entry.__module__.startswith(models.__name__):
        kwargs["input_size"] = args.input_size
    model = timm.create_model(args.model, **kwargs)
    result = summary(model, args.input_size, args.in_chans)
    print(f"{args.model} " + " ".join(f"{k}={v}" for k, v in kwargs.items()))
    print(result.table())
    return result


if __name__ == "__main__":
    main()
