"""The device half of the split input pipeline: flip, colour jitter and normalisation on a whole batch.

The workers send ``uint8`` crops (``N x H x W x 3``) and, for training, each sample's parameters
(:data:`PARAMS`: flip, brightness/contrast/saturation factors and the order of the three jitter ops),
drawn by torchvision's own ``get_params`` under the sample's seeded RNG. Here they are applied in fp32
on the batch's device with the arithmetic of torchvision's tensor ``ColorJitter`` (each op a blend
``clamp(f * x + (1 - f) * other, 0, 1)`` with ``other`` = 0 for brightness, the image's grey mean for
contrast, its grey image ``0.2989 R + 0.587 G + 0.114 B`` for saturation), then ``(x - mean) / std`` as
``ToTensor`` + ``Normalize`` do. Nothing here draws random numbers: a batch's result depends only on its
samples, whichever worker made them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PARAMS", "DeviceAugment", "DeviceNormalize", "to_unit_float"]

# columns of the per-sample parameter tensor the workers send
PARAMS: tuple[str, ...] = ("flip", "brightness", "contrast", "saturation", "op0", "op1", "op2")
_BRIGHTNESS, _CONTRAST, _SATURATION = 0, 1, 2  # torchvision's ColorJitter op ids (3, hue, is not supported)


def to_unit_float(images: Tensor) -> Tensor:
    """``uint8`` ``N x H x W x 3`` -> fp32 ``N x 3 x H x W`` in [0, 1], as ``ToTensor`` (``x / 255``)."""
    return images.permute(0, 3, 1, 2).float().div(255).contiguous()


class DeviceNormalize:
    """``uint8`` ``N x H x W x 3`` -> normalised fp32 ``N x 3 x H x W``: ``ToTensor`` then ``Normalize``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel of an fp32 ``N x 3 x H x W`` batch in [0, 1]."""
        mean, std = self._stats(x)
        return x.sub_(mean).div_(std)

    def __call__(self, images: Tensor) -> Tensor:
        return self.normalize(to_unit_float(images))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class DeviceAugment(DeviceNormalize):
    """``(uint8 N x H x W x 3, params N x 7)`` -> flipped, jittered, normalised fp32 ``N x 3 x H x W``."""

    def __call__(self, batch: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        images, params = batch
        x = to_unit_float(images)
        params = params.to(x.device, torch.float32)
        flip = params[:, 0].view(-1, 1, 1, 1) > 0.5
        x = torch.where(flip, x.flip(-1), x)
        return self.normalize(self.jitter(x, params[:, 1:4], params[:, 4:7].long()))

    @staticmethod
    def jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
        """Apply each sample's brightness/contrast/saturation ``factors`` (``N x 3``) in its ``order``
        (``N x 3`` op ids) to ``x`` (fp32 ``N x 3 x H x W`` in [0, 1])."""
        for step in range(order.shape[1]):
            op = order[:, step]
            f = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
            r, g, b = x.unbind(dim=1)
            grey = (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
            mean = grey.mean(dim=(1, 2, 3), keepdim=True)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            other = torch.where(
                (op == _SATURATION).view(-1, 1, 1, 1),
                grey,
                torch.where((op == _CONTRAST).view(-1, 1, 1, 1), mean, zero),
            )
            x = (f * x + (1.0 - f) * other).clamp_(0, 1)
        return x
