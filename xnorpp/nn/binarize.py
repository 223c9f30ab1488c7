"""``binarize(model, policy)``: turn any CNN's convolutions (and, if asked, linears) into binary ones.

Every ``nn.Conv2d`` (``nn.Linear`` with ``policy.linear``) the policy selects is replaced by a
:class:`~xnorpp.nn.BinaryConv2d` (:class:`~xnorpp.nn.BinaryLinear`) with the same arguments and a copy of
its weight and bias, so a pretrained model keeps its latent weights. Which layers, in this order:

1. only plain ``nn.Conv2d``/``nn.Linear`` layers that one traced forward at ``input_size`` runs (subclasses
   such as timm's ``Conv2dSame`` or ``StdConv2d`` change the convolution and stay as they are);
2. ``include`` (if given: only these) and ``exclude``, by module name or regex;
3. the first and the last layer the forward runs stay real (``keep_first``, ``keep_last``);
4. linears (``linear``), depthwise convolutions (``depthwise``), 1x1 convolutions (``pointwise``) and
   the layers ``downsample_pattern`` names (``downsample``) are binary or real as the policy says;
5. ``overrides``: ``{pattern: {binarize_weights, binarize_inputs, scale, estimator, centre_weights}}``,
   applied in order to the layers a pattern names, win over every rule of 2-4 (a later pattern over an
   earlier one). A layer left with neither weights nor inputs binary keeps its original module.

A binary input is ``sign(x)``: after a ReLU every sign would be +1. When the policy binarizes inputs,
``relu`` therefore replaces the model's ``nn.ReLU``/``nn.ReLU6`` modules (``prelu``: a learned slope, 0.25
at init, as ReActNet; ``hardtanh``: Bi-Real's clip; ``identity``; ``keep``); a binary-input layer whose
traced input is never negative is flagged in the map and warned about.

A pattern names a layer when it is the layer's name, the name of a module containing it
(``layer4`` names ``layer4.0.conv1``) or a regex matching the whole name (``layer[34]\\..*conv2``).
The spatial scales (``full``, ``channel_spatial``, ``rank1``) take each layer's output size from the
traced forward. The result is recorded as ``model.binarization_map`` (:class:`BinarizationMap`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .conv import BinaryConv2d
from .linear import BinaryLinear
from .scale import SPATIAL_SCALES, check_scale
from .sign import get_estimator

__all__ = ["OVERRIDE_KEYS", "RELU_REPLACEMENTS", "BinarizationMap", "BinarizePolicy", "LayerPlan", "binarize"]

OVERRIDE_KEYS: tuple[str, ...] = (
    "binarize_weights",
    "binarize_inputs",
    "scale",
    "estimator",
    "centre_weights",
)
DOWNSAMPLE_PATTERN = r"(.*\.)?(downsample|shortcut)(\..*)?"
RELU_REPLACEMENTS: dict[str, Callable[[], nn.Module] | None] = {
    "prelu": lambda: nn.PReLU(),
    "hardtanh": lambda: nn.Hardtanh(),
    "identity": lambda: nn.Identity(),
    "keep": None,
}


@dataclass
class BinarizePolicy:
    """Which layers :func:`binarize` makes binary, and how (module docstring: the order of the rules).

    ``weights``/``inputs``: what a selected layer binarizes; ``scale`` (``xnorpp.nn.SCALES``),
    ``estimator`` (``xnorpp.nn.ACTIVATION_ESTIMATORS``) and ``centre_weights`` configure it; ``relu``
    (:data:`RELU_REPLACEMENTS`) what becomes of the ReLUs when inputs are binarized.
    """

    weights: bool = True
    inputs: bool = True
    scale: str = "channel"
    estimator: str = "ste"
    centre_weights: bool = True
    relu: str = "prelu"
    keep_first: bool = True
    keep_last: bool = True
    linear: bool = False
    depthwise: bool = False
    pointwise: bool = True
    downsample: bool = True
    downsample_pattern: str = DOWNSAMPLE_PATTERN
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.include, self.exclude = list(self.include or []), list(self.exclude or [])
        self.overrides = {str(k): dict(v) for k, v in (self.overrides or {}).items()}
        check_scale(self.scale)
        get_estimator(self.estimator)
        if self.relu not in RELU_REPLACEMENTS:
            raise ValueError(
                f"unknown binarize relu {self.relu!r}; valid choices: {', '.join(RELU_REPLACEMENTS)}"
            )
        for pattern in [*self.include, *self.exclude, *self.overrides, self.downsample_pattern]:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"binarize policy: {pattern!r} is not a valid regex ({e})") from None
        for pattern, values in self.overrides.items():
            unknown = sorted(set(values) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(
                    f"binarize override {pattern!r}: unknown keys {unknown}; valid keys: {', '.join(OVERRIDE_KEYS)}"
                )
            if "scale" in values:
                check_scale(str(values["scale"]))
            if "estimator" in values:
                get_estimator(str(values["estimator"]))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BinarizePolicy:
        """From a config node; an unknown key is an error listing the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(
                f"unknown binarize policy keys {unknown}; valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerPlan:
    """What :func:`binarize` did with one ``Conv2d``/``Linear``: ``kind`` (``conv 3x3``, ``conv 1x1``,
    ``depthwise 3x3``, ``linear``), ``role`` (``first``, ``last``, ``downsample`` or empty), the binary
    settings, the traced ``output_size``, for a real layer ``reason`` and ``note`` (a warning)."""

    name: str
    type: str
    kind: str
    role: str
    binarize_weights: bool = False
    binarize_inputs: bool = False
    scale: str = "none"
    estimator: str = "ste"
    centre_weights: bool = True
    output_size: tuple[int, int] | None = None
    weight_params: int = 0
    reason: str = ""
    note: str = ""

    @property
    def binary(self) -> bool:
        return self.binarize_weights or self.binarize_inputs


@dataclass
class BinarizationMap:
    """Every candidate layer of a binarized model in forward order (unused ones last), with totals."""

    layers: list[LayerPlan] = field(default_factory=list)
    relus_replaced: int = 0
    relu: str = "keep"

    @property
    def binary_layers(self) -> list[str]:
        return [p.name for p in self.layers if p.binary]

    @property
    def params_binary(self) -> int:
        """Latent weights stored at 1 bit: the weights of the layers with ``binarize_weights``."""
        return sum(p.weight_params for p in self.layers if p.binarize_weights)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {**asdict(p), "output_size": list(p.output_size) if p.output_size else None} for p in self.layers
        ]

    def table(self) -> str:
        """One line per layer: name, kind, role, W/A bits, scale, estimator or why it stays real."""
        head = ("layer", "kind", "role", "W", "A", "scale", "estimator / why real")
        body = [
            (p.name, p.kind, p.role, "1" if p.binarize_weights else "32", "1" if p.binarize_inputs else "32",
             p.scale if p.binary else "-",
             " ".join(filter(None, [p.estimator if p.binarize_inputs else p.reason or "-", p.note])))
            for p in self.layers
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
        n = len(self.binary_layers)
        lines.append(
            f"{n} of {len(self.layers)} layers binary; {self.params_binary:,} binary weights"
            + (f"; {self.relus_replaced} ReLU modules -> {self.relu}" if self.relus_replaced else "")
        )
        return "\n".join(lines)


def _names(pattern: str, name: str) -> bool:
    """Whether ``pattern`` names the layer ``name`` (the name, a containing module, or a full regex)."""
    return name == pattern or name.startswith(pattern + ".") or re.fullmatch(pattern, name) is not None


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    k = "x".join(str(s) for s in m.kernel_size)  # type: ignore[union-attr]
    if m.groups > 1 and m.groups == m.in_channels:  # type: ignore[union-attr]
        return f"depthwise {k}"
    return f"conv {k}"


def _input_shape(model: nn.Module, input_size: Any, in_chans: int | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if input_size is None:
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 3:
        return size  # type: ignore[return-value]
    if in_chans is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first.in_channels if first is not None else int(getattr(model, "in_chans", 3))
    return (int(in_chans), size[0], size[1])


@torch.no_grad()
def _trace(model: nn.Module, shape: tuple[int, int, int]) -> dict[int, tuple[int, tuple[int, int], float]]:
    """``id(layer) -> (call order, output (H, W), smallest input)`` of every Conv2d/Linear one eval forward
    of a fixed random image runs (its own generator: the global random streams are untouched)."""
    seen: dict[int, tuple[int, tuple[int, int], float]] = {}

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if id(module) not in seen and isinstance(output, torch.Tensor):
            size = tuple(output.shape[-2:]) if isinstance(module, nn.Conv2d) else (1, 1)
            seen[id(module)] = (len(seen), size, float(inputs[0].min()))  # type: ignore[assignment]

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        model.eval()
        image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        model(image.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _plan(
    name: str, m: nn.Module, order: dict[int, Any], first: int, last: int, policy: BinarizePolicy
) -> LayerPlan:
    kind = _kind(m)
    traced = order.get(id(m))
    downsample = re.fullmatch(policy.downsample_pattern, name) is not None
    role = "first" if id(m) == first else "last" if id(m) == last else "downsample" if downsample else ""
    plan = LayerPlan(
        name, type(m).__name__, kind, role, scale=policy.scale, estimator=policy.estimator,
        centre_weights=policy.centre_weights,
        output_size=traced[1] if traced else None, weight_params=m.weight.numel(),  # type: ignore[union-attr]
    )  # fmt: skip
    if type(m) not in (nn.Conv2d, nn.Linear) or traced is None:
        plan.reason = (
            "not run by the forward" if traced is None else f"{type(m).__name__} is not a plain Conv2d/Linear"
        )
        plan.scale = "none"
        return plan
    rules = [
        (bool(policy.include) and not any(_names(p, name) for p in policy.include), "not in include"),
        (any(_names(p, name) for p in policy.exclude), "excluded"),
        (role == "first" and policy.keep_first, "first layer (keep_first)"),
        (role == "last" and policy.keep_last, "last layer (keep_last)"),
        (kind == "linear" and not policy.linear, "linear (policy.linear=false)"),
        (kind.startswith("depthwise") and not policy.depthwise, "depthwise (policy.depthwise=false)"),
        (kind == "conv 1x1" and not policy.pointwise, "1x1 (policy.pointwise=false)"),
        (downsample and not policy.downsample, "downsample (real in this variant)"),
        (not (policy.weights or policy.inputs), "this variant binarizes nothing"),
    ]
    plan.reason = next((why for applies, why in rules if applies), "")
    if not plan.reason:
        plan.binarize_weights, plan.binarize_inputs = policy.weights, policy.inputs
    for pattern, values in policy.overrides.items():
        if _names(pattern, name):
            for key, value in values.items():
                setattr(plan, key, str(value) if key in ("scale", "estimator") else bool(value))
            plan.reason = f"override {pattern!r}" if not plan.binary else ""
    if not plan.binary:
        plan.scale = "none"
    if plan.binarize_inputs and traced[2] >= 0:
        plan.note = "(input never negative in the trace: every sign is +1)"
    return plan


def _binary_module(m: nn.Module, plan: LayerPlan) -> nn.Module:
    binary = {
        "binarize_weights": plan.binarize_weights, "binarize_inputs": plan.binarize_inputs, "scale": plan.scale,
        "estimator": plan.estimator, "centre_weights": plan.centre_weights,
        "output_size": plan.output_size if plan.scale in SPATIAL_SCALES else None,
    }  # fmt: skip
    if isinstance(m, nn.Linear):
        return BinaryLinear.from_linear(m, **binary)
    assert isinstance(m, nn.Conv2d)
    w = m.weight
    conv = BinaryConv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype, **binary,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(w)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def binarize(
    model: nn.Module,
    policy: BinarizePolicy | Mapping[str, Any] | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    in_chans: int | None = None,
) -> nn.Module:
    """Replace the layers ``policy`` selects by binary ones, in place; returns ``model``.

    ``input_size``: ``S``, ``(H, W)`` or ``(C, H, W)`` of the traced forward (default: the model's timm
    ``pretrained_cfg`` size, else 224; channels from the first convolution). The spatial scales are
    built for this size, so train and evaluate at it. The map of what happened is
    ``model.binarization_map``; calling ``binarize`` on an already binarized model is an error.
    """
    if policy is None:
        policy = BinarizePolicy()
    elif not isinstance(policy, BinarizePolicy):
        policy = BinarizePolicy.from_dict(policy)
    if isinstance(model, (nn.Conv2d, nn.Linear)) or any(isinstance(m, BinaryConv2d) for m in model.modules()):
        raise ValueError("binarize takes a model whose layers are not binary yet (and not a single layer)")
    shape = _input_shape(model, input_size, in_chans)
    binary_inputs = policy.inputs or any(v.get("binarize_inputs") for v in policy.overrides.values())
    relus = (
        _replace_modules(model, (nn.ReLU, nn.ReLU6), RELU_REPLACEMENTS[policy.relu]) if binary_inputs else 0
    )
    order = _trace(model, shape)
    ranked = sorted(order, key=lambda k: order[k][0])
    first, last = (ranked[0], ranked[-1]) if ranked else (-1, -1)
    plans: list[tuple[LayerPlan, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            plans.append((_plan(name, m, order, first, last, policy), m))
    plans.sort(key=lambda pm: order.get(id(pm[1]), (len(order), None))[0])
    replace = {id(m): _binary_module(m, plan) for plan, m in plans if plan.binary}
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replace:
                parent._modules[child_name] = replace[id(child)]
    model.binarization_map = BinarizationMap(
        [plan for plan, _ in plans], relus, policy.relu if relus else "keep"
    )
    constant = [plan.name for plan, _ in plans if plan.note]
    if constant:
        warnings.warn(
            f"{len(constant)} binary-input layers (e.g. {constant[0]!r}) had no negative input in the traced "
            "forward (a random image, the current weights): after a ReLU, a sigmoid or a pooling of such, every "
            "sign is +1. Set the policy's relu to prelu/hardtanh/identity, or keep those inputs real (overrides)",
            stacklevel=2,
        )
    return model


def _replace_modules(
    model: nn.Module, types: tuple[type[nn.Module], ...], make: Callable[[], nn.Module] | None
) -> int:
    """Replace every module of exactly one of ``types`` by ``make()`` (one new module per original, so a
    shared one stays shared); returns how many were replaced."""
    if make is None:
        return 0
    new: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in types:
                parent._modules[name] = new.setdefault(id(child), make())
    return len(new)
