"""Augmentation policies by name: ``data.augment=imagenet|small|translate|none|auto`` (also ``true``/``false``).

A policy turns an :class:`AugmentContext` (image size, flip switch, input kind, normalisation) into the
training transform; validation never augments. Built in (:data:`AUGMENTATIONS`):

- ``imagenet``: the original project's ImageNet recipe: ``RandomResizedCrop(size, scale=(0.08, 1))``,
  horizontal flip, ``ColorJitter(0.4, 0.4, 0.4)`` (photos only). Made for photos of a few hundred pixels;
  on small images a crop of 8% of the area leaves a handful of pixels.
- ``small``: pad by ``size / 8`` pixels and random-crop back to ``size``, plus horizontal flip: the
  standard recipe for CIFAR-sized images (4 px at 32x32). Image files are padded by reflection
  (``data.pad_mode``, :data:`PAD_MODES`): a black frame on images with a coloured background is an edge
  the network learns instead of the content (measured: a folder of digits in random colours stayed near
  chance with black padding).
- ``translate``: random translation by up to ``max_shift`` pixels (default ``size / 16``), no flip:
  what ``mnist5k`` does (2 px at 32x32).
- ``none``: no augmentation (train images are prepared as validation ones).

``auto`` picks ``small`` at :data:`AUTO_MAX_SIZE` pixels and below and ``imagenet`` above. ``true``
means the dataset's own default policy, ``false`` means ``none``. ``hflip=False`` switches horizontal
flips off (digits, text, anything whose mirror image means something else).

Inputs are PIL images (folders, CIFAR; the policy ends with ``ToTensor`` and ``Normalize``) or
normalised in-memory tensors (mnist5k, synthetic; geometric policies only, padding with the normalised
value of black: their backgrounds are black). All randomness comes from torch's global RNG, which the loaders seed per sample.
A user adds a policy from their own module with :func:`register_policy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor
from torchvision import transforms as T

from ..registry import Registry
from .base import RandomTranslate

__all__ = [
    "AUGMENTATIONS",
    "AUTO_MAX_SIZE",
    "AugmentContext",
    "AugmentPolicy",
    "build_folder_transform",
    "build_transforms",
    "register_policy",
    "resolve_policy",
]

log = logging.getLogger(__name__)

AUTO_MAX_SIZE = 64  # ``auto``: ``small`` up to this side length (pixels), ``imagenet`` above
INPUTS = ("pil", "tensor")
Transform = Callable[[Any], Tensor]


@dataclass(frozen=True)
class AugmentContext:
    """What a policy needs to build its transform.

    ``input`` is ``"pil"`` (decoded images of any size: the transform must resize to ``image_size``,
    convert and normalise) or ``"tensor"`` (normalised ``C x S x S`` tensors already at ``image_size``).
    ``crop_pct`` is the validation centre-crop fraction (resize to ``image_size / crop_pct`` first).
    ``options`` holds policy-specific settings (``scale``, ``ratio``, ``color_jitter``, ``max_shift``,
    ``padding``).
    """

    image_size: int
    hflip: bool
    input: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def black(self) -> tuple[float, ...]:
        """The normalised value of a black pixel, per channel (padding of normalised tensors)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))


@dataclass(frozen=True)
class AugmentPolicy:
    """A registered policy: ``build(ctx)`` returns the train transform (``None``: none needed)."""

    name: str
    build: Callable[[AugmentContext], Transform | None]
    inputs: tuple[str, ...]
    options: tuple[str, ...]
    about: str


AUGMENTATIONS: Registry[AugmentPolicy] = Registry(
    "augmentation policy", "data.augment", "xnorpp.data.AUGMENTATIONS"
)


def register_policy(
    name: str, *, inputs: Sequence[str] = INPUTS, options: Sequence[str] = (), about: str = ""
) -> Callable[[Callable[[AugmentContext], Transform | None]], Callable[[AugmentContext], Transform | None]]:
    """Decorator: register ``build(ctx) -> transform`` as policy ``name`` for the given input kinds;
    ``options`` are the ``ctx.options`` keys it reads (``data.<option>`` in configs)."""
    bad = set(inputs) - set(INPUTS)
    if bad:
        raise ValueError(f"unknown input kinds {sorted(bad)}; valid: {', '.join(INPUTS)}")

    def add(
        build: Callable[[AugmentContext], Transform | None],
    ) -> Callable[[AugmentContext], Transform | None]:
        AUGMENTATIONS.register(name)(AugmentPolicy(name, build, tuple(inputs), tuple(options), about))
        return build

    return add


# ------------------------------------------------------------------------------------------- transforms
def _use_torch_rng(transform: T.Compose) -> T.Compose:
    """Replace timm's random-resized-crop (python ``random``) by torchvision's (torch RNG)."""
    steps = []
    for t in transform.transforms:
        if isinstance(t, RandomResizedCropAndInterpolation):
            if isinstance(t.interpolation, (list, tuple)):
                raise ValueError("random interpolation is not supported; use e.g. interpolation='bilinear'")
            t = T.RandomResizedCrop(t.size, scale=t.scale, ratio=t.ratio, interpolation=t.interpolation)
        steps.append(t)
    return T.Compose(steps)


def build_folder_transform(
    image_size: int,
    *,
    training: bool,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> Callable[[Any], Tensor]:
    """PIL image -> normalised ``3 x image_size x image_size`` tensor (timm ``create_transform``).

    ``training=True``: the ImageNet recipe (random-resized crop, flip with probability ``hflip``, colour
    jitter; no auto-augment, no random erasing), randomness from torch's global RNG. ``training=False``:
    resize the short side to ``floor(image_size / crop_pct)``, then centre crop (deterministic).
    """
    common: dict[str, Any] = {"interpolation": interpolation, "mean": tuple(mean), "std": tuple(std)}
    if not training:
        return create_transform(image_size, is_training=False, crop_pct=crop_pct, **common)
    tf = create_transform(
        image_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        color_jitter=color_jitter if color_jitter else None, auto_augment=None, re_prob=0.0, **common,
    )  # fmt: skip
    return _use_torch_rng(tf)


def _pil_pipeline(ctx: AugmentContext, middle: list[Any]) -> T.Compose:
    """Resize the short side to ``image_size`` and centre crop, then ``middle``, then tensor + normalise."""
    mode = T.InterpolationMode(ctx.interpolation)
    return T.Compose([
        T.Resize(ctx.image_size, interpolation=mode), T.CenterCrop(ctx.image_size), *middle, T.ToTensor(),
        T.Normalize(ctx.mean, ctx.std),
    ])  # fmt: skip


PAD_MODES: tuple[str, ...] = ("reflect", "edge", "symmetric", "constant")  # constant: black


def _shift_and_flip(ctx: AugmentContext, shift: int, flip: bool) -> Transform:
    flips = [T.RandomHorizontalFlip()] if flip else []
    mode = str(ctx.options.get("pad_mode") or ("reflect" if ctx.input == "pil" else "constant"))
    if mode not in PAD_MODES:
        raise ValueError(f"data.pad_mode={mode!r}: valid choices are {', '.join(PAD_MODES)}")
    if ctx.input == "pil":
        return _pil_pipeline(
            ctx, [T.RandomCrop(ctx.image_size, padding=shift, fill=0, padding_mode=mode), *flips]
        )
    if mode != "constant":
        raise ValueError(
            f"data.pad_mode={mode} applies to image files (folders, CIFAR); in-memory data pads with black: "
            "leave data.pad_mode unset"
        )
    return T.Compose([RandomTranslate(shift, fill=ctx.black), *flips])


def _option_int(ctx: AugmentContext, key: str, default: int) -> int:
    value = ctx.options.get(key)
    value = default if value is None else int(value)
    if value < 0:
        raise ValueError(f"data.{key} must be >= 0, got {value}")
    return value


@register_policy(
    "imagenet", inputs=("pil",), options=("scale", "ratio", "color_jitter"),
    about="random-resized crop (8-100% of the area), flip, colour jitter 0.4",
)  # fmt: skip
def imagenet_policy(ctx: AugmentContext) -> Transform:
    o = ctx.options
    return build_folder_transform(
        ctx.image_size, training=True, mean=ctx.mean, std=ctx.std, scale=o.get("scale") or (0.08, 1.0),
        ratio=o.get("ratio") or (3.0 / 4.0, 4.0 / 3.0), hflip=0.5 if ctx.hflip else 0.0,
        color_jitter=o.get("color_jitter", 0.4), interpolation=ctx.interpolation,
    )  # fmt: skip


@register_policy(
    "small",
    options=("padding", "pad_mode"),
    about="pad by 1/8 of the side (reflected), random crop back, flip",
)
def small_policy(ctx: AugmentContext) -> Transform:
    return _shift_and_flip(ctx, _option_int(ctx, "padding", max(1, round(ctx.image_size / 8))), ctx.hflip)


@register_policy(
    "translate",
    options=("max_shift", "pad_mode"),
    about="random translation by up to max_shift pixels (1/16 of the side), no flip",
)
def translate_policy(ctx: AugmentContext) -> Transform:
    return _shift_and_flip(ctx, _option_int(ctx, "max_shift", max(1, round(ctx.image_size / 16))), False)


@register_policy("none", about="no augmentation")
def none_policy(ctx: AugmentContext) -> Transform | None:
    return eval_transform(ctx)


def eval_transform(ctx: AugmentContext) -> Transform | None:
    """Validation: resize + centre crop + normalise for PIL input; nothing for prepared tensors."""
    if ctx.input == "tensor":
        return None
    return build_folder_transform(
        ctx.image_size, training=False, mean=ctx.mean, std=ctx.std, crop_pct=ctx.crop_pct,
        interpolation=ctx.interpolation,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- choice
def resolve_policy(augment: str | bool | None, image_size: int, default: str) -> tuple[str, str]:
    """``(policy name, reason)`` for a ``data.augment`` value; ``default`` is what ``true`` means."""
    text = "true" if augment is None else str(augment).strip().lower()
    if text == "false":
        return "none", "data.augment=false"
    reason = f"data.augment={text}"
    if text == "true":
        text, reason = default, f"data.augment=true: this dataset's default, {default}"
    if text == "auto":
        if image_size <= AUTO_MAX_SIZE:
            return "small", (
                f"{reason}: {image_size} px <= {AUTO_MAX_SIZE} px, so small (pad and random-crop, flip); "
                "imagenet's random-resized crop down to 8% of the area would leave a few pixels"
            )
        return "imagenet", f"{reason}: {image_size} px > {AUTO_MAX_SIZE} px, so the ImageNet recipe"
    if text not in AUGMENTATIONS:
        raise ValueError(
            f"unknown data.augment {augment!r}; valid choices: auto, true, false, {', '.join(AUGMENTATIONS)}"
        )
    return text, reason


def build_transforms(
    augment: str | bool | None,
    *,
    dataset: str,
    default: str,
    image_size: int,
    input: str,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: bool = True,
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
    **options: Any,
) -> tuple[Transform | None, Transform | None, str]:
    """``(train transform, val transform, policy name)`` for one dataset, logging which policy and why.

    ``crop_pct=None`` (validation centre-crop fraction) is 0.875 above :data:`AUTO_MAX_SIZE` pixels
    (ImageNet's 224 of 256) and 1.0 below, where cutting the border would lose a large part of the image.
    """
    name, reason = resolve_policy(augment, image_size, default)
    policy = AUGMENTATIONS.get(name)
    known = {o for p in AUGMENTATIONS.values() for o in p.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{dataset}: unknown option(s) {', '.join(f'data.{k}' for k in unknown)}; the augmentation "
            f"policies take {', '.join(sorted(known))}"
        )
    if input not in policy.inputs:
        raise ValueError(
            f"data.augment={name} needs {' or '.join(policy.inputs)} input, but {dataset} holds prepared "
            f"tensors; choose one of: {', '.join(n for n, p in AUGMENTATIONS.items() if input in p.inputs)}"
        )
    if crop_pct is None:
        crop_pct = 0.875 if image_size > AUTO_MAX_SIZE else 1.0
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1], got {crop_pct}")
    ctx = AugmentContext(
        image_size=int(image_size), hflip=bool(hflip), input=input, mean=tuple(map(float, mean)),
        std=tuple(map(float, std)), crop_pct=float(crop_pct), interpolation=interpolation, options=options,
    )  # fmt: skip
    flip = "" if not hflip or name in ("translate", "none") else ", data.hflip=false turns flips off"
    log.info("%s: augmentation %s (%s%s)", dataset, name, reason, flip)
    if name == "imagenet" and image_size <= AUTO_MAX_SIZE:
        log.warning(
            "%s: data.augment=imagenet on %d px images: random-resized crops down to 8%% of the area leave "
            "%d px of detail and cost small-image data much of its accuracy; data.augment=small (or auto) "
            "is the usual recipe at this size",
            dataset, image_size, math.isqrt(int(0.08 * image_size**2)),
        )  # fmt: skip
    return policy.build(ctx), eval_transform(ctx), name
