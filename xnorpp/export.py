"""Bit-packed export of trained binary networks, and the inference model rebuilt from it.

File format (version 1): ONE ``.safetensors`` file, self-contained, no side-car.

- Metadata: the safetensors header's ``__metadata__`` holds ``{"format": "pt", "xnorpp": JSON}``; the
  JSON (read it with :func:`read_export_metadata`) records ``format`` (``"xnorpp-binary-export"``),
  ``format_version``, ``architecture`` (timm name), ``variant`` (binarization), ``scale``,
  ``input_size`` ``[H, W]``, ``num_classes``, ``in_chans``, ``stem``, ``estimator``, the full
  ``model_args`` (what :func:`build_model_from_args` needs), ``bit_order``, ``packed`` (one entry per
  packed layer: ``name``, ``key``, ``shape``, ``scale``) and ``xnor_alpha`` (layers with a stored
  analytic alpha).
- Packed binary weights: for every :class:`~xnorpp.nn.BinaryConv2d` with ``binarize_weights=True``,
  ``<layer>.weight_packed`` (``uint8``, shape ``(C_out, ceil(K / 8))``, ``K = C_in/groups * kh * kw``)
  holds ``binary_weight()``, i.e. ``sign(W - mean_dim1 W)`` with ``sign(0) = +1``. Each filter is
  flattened in ``(c_in, kh, kw)`` order; element ``k`` is bit ``k % 8`` (LSB first, "little" bit
  order) of byte ``k // 8``; bit ``1`` = ``+1``, ``0`` = ``-1``; trailing pad bits are 0. The latent
  real weight is not stored.
- Learned scale factors are stored as their own fp32 parameters (``alpha``/``beta``/``gamma``, e.g.
  ``C + H + W`` numbers for ``rank1``), not as a precomputed ``Gamma``: smaller and the loaded
  layer is the trained layer's exact module.
- ``xnor``/``xnor_k``/``magnitude_aware`` scales use ``alpha = mean|W - mean_dim1 W|`` per filter, which the signs cannot
  give back: ``<layer>.scale_factor.alpha`` stores it (fp32, ``(C_out,)``) and the loaded layer's scale
  becomes :class:`FrozenXnorScale`, which uses the stored alpha (and still computes ``K`` from the
  input for ``xnor_k``).
- Everything else (stem, BN affine and running stats, real downsample convs, classifier, ...) is
  stored as in the state dict, floating tensors as fp32 (integer buffers such as BN's
  ``num_batches_tracked`` unchanged).

Loading (:func:`load_export`) rebuilds the architecture from the metadata, unpacks the signs into
``+-1`` latent weights and sets ``centre_weights=False`` on those layers, so ``binary_weight() =
sign(+-1) = +-1`` is the stored sign tensor verbatim. Re-centring ``b`` in ``{-1, +1}^C`` would give
``sign(b - mean b) = b`` except on a tap whose channels are all ``-1`` (``b - mean b = 0 -> +1``): such a
tap cannot come from an exactly centred weight, but can from fp rounding of ``W - mean W``, and the
analytic ``alpha = mean|c|`` of the ``xnor`` scales would be wrong anyway. With centring off the
loaded model (eval mode) computes exactly the trained model's function.

CLI: ``python -m xnorpp.export CKPT OUT`` reads a training checkpoint (``torch.save`` of a dict with
``"model"``, a state dict, and ``"model_args"``, the ``timm.create_model`` arguments including
``"name"``), exports it and prints the file size against the fp32 model state.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import models as _models  # registers the timm models; builds binarized timm models
from .nn.conv import BinaryConv2d
from .nn.scale import ANALYTIC_SCALES, XnorScale

__all__ = [
    "BIT_ORDER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ExportReport",
    "FrozenXnorScale",
    "build_model_from_args",
    "export_checkpoint",
    "export_model",
    "is_binary_architecture",
    "load_checkpoint",
    "load_export",
    "main",
    "pack_signs",
    "read_export_metadata",
    "state_bytes_fp32",
    "unpack_signs",
]

FORMAT_NAME = "xnorpp-binary-export"
FORMAT_VERSION = 1
METADATA_KEY = "xnorpp"
PACKED_SUFFIX = "weight_packed"
XNOR_SCALES = ANALYTIC_SCALES  # alpha = mean|c| per filter: stored, the signs cannot give it back
BIT_ORDER = (
    "per output filter, flattened over (c_in, kh, kw); element k is bit k%8 (LSB first) of byte k//8; "
    "1 = +1, 0 = -1; pad bits 0"
)


@dataclass
class ExportReport:
    """Result of an export: file ``path`` and size ``bytes``, the fp32 state size, their ratio
    ``bytes / fp32_bytes`` and the names of the bit-packed layers."""

    path: Path
    bytes: int
    fp32_bytes: int
    ratio: float
    packed_layers: list[str] = field(default_factory=list)


class FrozenXnorScale(XnorScale):
    """XNOR-Net scale with a stored per-filter ``alpha`` buffer instead of ``mean|W|`` of the weight.

    ``out = y . alpha`` (``xnor``) or ``y . alpha . K(x)`` (``xnor_k``), ``alpha`` of shape ``(C_out,)``.
    Used by exported models, whose latent weights are ``+-1`` and no longer give ``alpha``.
    """

    def __init__(
        self,
        channels: int,
        with_k: bool = False,
        kernel_size: tuple[int, int] = (1, 1),
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__(with_k, kernel_size, stride, padding, dilation)
        self.register_buffer("alpha", torch.ones(channels))

    @classmethod
    def like(cls, scale: XnorScale, channels: int) -> FrozenXnorScale:
        """A frozen copy of ``scale``'s configuration (alpha = 1 until loaded)."""
        return cls(channels, scale.with_k, scale.kernel_size, scale.stride, scale.padding, scale.dilation)

    def forward(self, y: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        # XnorScale takes mean over (1, 2, 3) of |w|: a (C, 1, 1, 1) tensor of alpha >= 0 gives alpha.
        return super().forward(y, self.alpha.view(-1, 1, 1, 1), x)


# --------------------------------------------------------------------------- packing


def pack_signs(w: Tensor) -> Tensor:
    """Pack a ``+-1`` weight ``(C_out, ...)`` into ``uint8`` ``(C_out, ceil(K/8))``, see :data:`BIT_ORDER`.

    Bit ``= 1`` where ``w >= 0`` (``sign(0) = +1``).
    """
    bits = (w.detach().reshape(w.shape[0], -1) >= 0).to(torch.uint8)
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(bits.shape[0], pad)], dim=1)
    bits = bits.reshape(bits.shape[0], -1, 8)
    packed = bits[..., 0].clone()
    for j in range(1, 8):
        packed |= bits[..., j] << j
    return packed.cpu().contiguous()


def unpack_signs(packed: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: ``+-1`` tensor of ``shape`` (``2 * bit - 1``)."""
    shape = tuple(int(s) for s in shape)
    k = 1
    for s in shape[1:]:
        k *= s
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != shape[0]:
        raise ValueError(f"packed tensor {tuple(packed.shape)} {packed.dtype} does not fit shape {shape}")
    if packed.shape[1] != -(-k // 8):
        raise ValueError(
            f"packed tensor has {packed.shape[1]} bytes per filter, shape {shape} needs {-(-k // 8)}"
        )
    shifts = torch.arange(8, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(shape[0], -1)[:, :k]
    return (bits * 2 - 1).to(dtype).reshape(shape)


# --------------------------------------------------------------------------- models


def is_binary_architecture(name: str) -> bool:
    """Whether timm model ``name`` is one of xnorpp's binary ResNets (which take the binary arguments)."""
    return name.endswith("_preact_bin")


def build_model_from_args(model_args: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(name, **rest, **kwargs)`` from a checkpoint's ``model_args`` (``name`` is required;
    ``kwargs``: the model's own further arguments, ``model.kwargs``); other timm models than xnorpp's
    binary ResNets (``model=timm_resnet18``) get ``num_classes``, ``in_chans`` and ``kwargs`` only, and with
    a ``binarize`` policy (``model=timm``) are binarized by :func:`xnorpp.models.create_binarized`."""
    args = dict(model_args)
    name = args.pop("name", None)
    extra = dict(args.pop("kwargs", None) or {})
    if not name:
        raise ValueError(f"model_args has no 'name' (the timm model name); got keys {sorted(model_args)}")
    if "binarize" in args:
        return _models.create_binarized(model_args)
    if not is_binary_architecture(name):
        args = {k: args[k] for k in ("num_classes", "in_chans") if k in args}
    try:
        return timm.create_model(name, **args, **extra)
    except TypeError as e:
        raise ValueError(f"model_args {dict(model_args)} do not build timm model {name!r}: {e}") from e


def state_bytes_fp32(state: Mapping[str, Tensor]) -> int:
    """Bytes of a state dict stored in fp32: ``4 * numel`` per floating tensor, native size otherwise."""
    total = 0
    for t in state.values():
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def _packed_convs(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.binarize_weights]


def _freeze_binary_layers(model: nn.Module, packed: Sequence[str], xnor_alpha: Sequence[str]) -> None:
    """Turn ``packed`` layers into stored-sign layers (``centre_weights=False``) and give the
    ``xnor_alpha`` layers a :class:`FrozenXnorScale`."""
    modules = dict(model.named_modules())
    for name in packed:
        conv = modules.get(name)
        if not isinstance(conv, BinaryConv2d) or not conv.binarize_weights:
            raise ValueError(f"packed layer {name!r} is not a weight-binarizing BinaryConv2d in the model")
        conv.centre_weights = False
    for name in xnor_alpha:
        conv = modules[name]
        if not isinstance(conv, BinaryConv2d) or conv.scale not in XNOR_SCALES:
            raise ValueError(f"layer {name!r} has a stored xnor alpha but scale {conv.scale!r}")
        if not isinstance(conv.scale_factor, FrozenXnorScale):
            conv.scale_factor = FrozenXnorScale.like(conv.scale_factor, conv.out_channels)


def _check_against_args(
    model: nn.Module,
    model_args: Mapping[str, Any],
    packed: Sequence[str],
    xnor_alpha: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise if ``model_args`` do not build ``model``'s architecture: same binary-layer flags, and the
    state keys/shapes the export will hold (``shapes``) are those :func:`load_export` will expect."""
    reference = build_model_from_args(model_args)
    ref_convs = {n: m for n, m in reference.named_modules() if isinstance(m, BinaryConv2d)}
    for name, m in model.named_modules():
        if isinstance(m, BinaryConv2d):
            r = ref_convs.get(name)
            got = (m.binarize_weights, m.binarize_inputs, m.scale)
            want = None if r is None else (r.binarize_weights, r.binarize_inputs, r.scale)
            if got != want:
                raise ValueError(
                    f"layer {name!r} is (binarize_weights, binarize_inputs, scale)={got} but model_args "
                    f"build {want}: model_args do not describe this model"
                )
    _freeze_binary_layers(reference, packed, xnor_alpha)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        raise ValueError(
            "model_args do not describe this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )


# --------------------------------------------------------------------------- export / load


def export_model(model: nn.Module, model_args: Mapping[str, Any], out: str | Path) -> ExportReport:
    """Write ``model`` as a bit-packed safetensors file ``out`` (format in the module docstring).

    ``model_args`` are the ``timm.create_model`` arguments (with ``name``) that build ``model``'s
    architecture; they are checked against the model (layer flags, state keys and shapes).
    """
    out = Path(out)
    try:
        args_json = json.loads(json.dumps(dict(model_args)))
    except TypeError as e:
        raise ValueError(f"model_args must be JSON-serialisable (str/int/float/lists): {e}") from None
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    packed_entries: list[dict[str, Any]] = []
    xnor_alpha: list[str] = []
    packed_weight_keys: set[str] = set()
    with torch.no_grad():
        for name, conv in _packed_convs(model):
            prefix = f"{name}." if name else ""
            wkey, pkey = f"{prefix}weight", f"{prefix}{PACKED_SUFFIX}"
            w = conv.binary_weight()
            tensors[pkey] = pack_signs(w)
            shapes[wkey] = tuple(w.shape)
            packed_weight_keys.add(wkey)
            packed_entries.append({"name": name, "key": pkey, "shape": list(w.shape), "scale": conv.scale})
            if conv.scale in XNOR_SCALES:
                if isinstance(conv.scale_factor, FrozenXnorScale):
                    alpha = conv.scale_factor.alpha
                else:
                    alpha = conv.scaled_weight_source().abs().mean(dim=(1, 2, 3))
                akey = f"{prefix}scale_factor.alpha"
                tensors[akey] = alpha.detach().float().cpu().contiguous()
                shapes[akey] = tuple(alpha.shape)
                xnor_alpha.append(name)
    for key, t in state.items():
        if key in packed_weight_keys or key in tensors:
            continue
        t = t.detach().cpu()
        tensors[key] = (t.float() if t.is_floating_point() else t).contiguous().clone()
        shapes[key] = tuple(t.shape)

    _check_against_args(model, args_json, [e["name"] for e in packed_entries], xnor_alpha, shapes)

    a = args_json
    binary = is_binary_architecture(a["name"]) or "binarize" in a
    input_size = getattr(model, "input_size", a.get("input_size"))
    if isinstance(input_size, int):
        input_size = [input_size, input_size]
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "xnorpp_version": getattr(sys.modules[__package__], "__version__", "unknown"),
        "architecture": a["name"],
        "variant": getattr(model, "binarization", a.get("binarization")) if binary else "fp",
        "scale": getattr(model, "scale", a.get("scale")) if binary else "none",
        "input_size": list(input_size) if input_size is not None else None,
        "num_classes": a.get("num_classes", getattr(model, "num_classes", None)),
        "in_chans": a.get("in_chans", getattr(model, "in_chans", None)),
        "stem": a.get("stem", getattr(model, "stem_type", None)) if binary else None,
        "estimator": a.get("estimator") if binary else None,
        "model_args": args_json,
        "bit_order": BIT_ORDER,
        "packed": packed_entries,
        "xnor_alpha": xnor_alpha,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    size = out.stat().st_size
    fp32 = state_bytes_fp32(state)
    return ExportReport(
        out, size, fp32, size / fp32 if fp32 else float("nan"), [e["name"] for e in packed_entries]
    )


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata JSON of an export file (raises if ``path`` is missing or not an xnorpp export)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if METADATA_KEY not in header:
        raise ValueError(
            f"{path} is not an xnorpp export (no {METADATA_KEY!r} entry in its safetensors metadata)"
        )
    meta = json.loads(header[METADATA_KEY])
    if meta.get("format") != FORMAT_NAME or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported export format {meta.get('format')!r} version {meta.get('format_version')!r} "
            f"(this xnorpp reads {FORMAT_NAME!r} up to version {FORMAT_VERSION})"
        )
    return meta


def load_export(path: str | Path) -> nn.Module:
    """Rebuild the inference model (eval mode) from an export file alone.

    Architecture from the metadata's ``model_args``; packed layers get ``+-1`` weights from the signs
    and ``centre_weights=False`` (so ``binary_weight() = sign(+-1) = +-1``, no re-centring); xnor
    layers get a :class:`FrozenXnorScale` with the stored alpha; all other tensors load as stored.
    """
    meta = read_export_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    model = build_model_from_args(meta["model_args"])
    _freeze_binary_layers(model, [e["name"] for e in meta["packed"]], meta.get("xnor_alpha", []))
    state: dict[str, Tensor] = {}
    for entry in meta["packed"]:
        if entry["key"] not in tensors:
            raise ValueError(f"{path}: packed tensor {entry['key']!r} listed in the metadata is missing")
        prefix = f"{entry['name']}." if entry["name"] else ""
        state[f"{prefix}weight"] = unpack_signs(tensors.pop(entry["key"]), entry["shape"])
    state.update(tensors)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- checkpoints and CLI


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, model_args)`` of a training checkpoint, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load checkpoint {path} with torch.load(weights_only=True): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict with 'model' and 'model_args'"
        )
    missing = [k for k in ("model", "model_args") if k not in ckpt]
    if missing:
        raise ValueError(
            f"checkpoint {path} has no {' / '.join(repr(k) for k in missing)} entry (keys: {sorted(ckpt)}); "
            "an exportable checkpoint holds 'model' (the state dict) and 'model_args' (timm.create_model "
            "arguments with 'name')"
        )
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_args"], dict):
        raise ValueError(f"checkpoint {path}: 'model' and 'model_args' must both be dicts")
    return _strip_prefix(dict(ckpt["model"])), dict(ckpt["model_args"])


def export_checkpoint(ckpt: str | Path, out: str | Path) -> ExportReport:
    """Load a training checkpoint, rebuild its model (strict state load) and export it to ``out``."""
    state, model_args = load_checkpoint(ckpt)
    model = build_model_from_args(model_args)
    model.load_state_dict(state, strict=True)
    return export_model(model, model_args, out)


def _format_bytes(n: int) -> str:
    return f"{n:,} B ({n / 2**20:.2f} MiB)"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m xnorpp.export CKPT OUT``; prints the sizes; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m xnorpp.export",
        description="Bit-packed safetensors export of a binary network checkpoint.",
    )
    parser.add_argument(
        "checkpoint", help="training checkpoint (torch.save dict with 'model' and 'model_args')"
    )
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        report = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {len(report.packed_layers)} bit-packed binary layers to {report.path}")
    print(f"export file:          {_format_bytes(report.bytes)}")
    print(f"fp32 model state:     {_format_bytes(report.fp32_bytes)}")
    print(f"ratio export / fp32:  {report.ratio:.4f} ({1 / report.ratio:.1f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
