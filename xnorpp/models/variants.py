"""The binarization variants: which parts of a binary network are binary (``binarization`` group)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BINARIZATIONS", "Binarization", "get_binarization"]


@dataclass(frozen=True)
class Binarization:
    """Which parts of the network are binary: block weights, block inputs, and whether the downsample
    shortcut's 1x1 conv is binarized like the block convs."""

    name: str
    weights: bool
    inputs: bool
    downsample: bool

    @property
    def any(self) -> bool:
        return self.weights or self.inputs


BINARIZATIONS: dict[str, Binarization] = {
    "fp": Binarization("fp", weights=False, inputs=False, downsample=False),
    "weight_only": Binarization("weight_only", weights=True, inputs=False, downsample=False),
    "full_binary": Binarization("full_binary", weights=True, inputs=True, downsample=True),
    "real_downsample": Binarization("real_downsample", weights=True, inputs=True, downsample=False),
    # binary activations, real weights: the first step of two-step recipes (ReActNet's step 1)
    "activation_only": Binarization("activation_only", weights=False, inputs=True, downsample=False),
}


def get_binarization(name: str) -> Binarization:
    """The variant called ``name``; a ``ValueError`` lists the valid ones otherwise."""
    try:
        return BINARIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown binarization {name!r}; valid choices: {', '.join(BINARIZATIONS)}"
        ) from None
