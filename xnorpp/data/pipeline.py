"""Input pipelines by name: ``data.pipeline=auto|pil|split|gpu_decode|dali`` (:data:`PIPELINES`).

- ``pil``: the original: each DataLoader worker decodes with PIL and runs the whole torchvision
  transform (random-resized crop, flip, colour jitter, ``ToTensor``, ``Normalize``) on one image.
- ``split``: workers only decode and crop/resize to ``uint8`` (:mod:`xnorpp.data.decode`: the crop's
  region at a reduced DCT scale), and draw each sample's flip and jitter parameters; the batch goes to
  the device (pinned, non-blocking) where :class:`~xnorpp.data.device_augment.DeviceAugment` flips,
  jitters and normalises it whole. A :class:`DeviceLoader` prepares the next batch (on CUDA on a side
  stream) while the current one trains.
- ``gpu_decode``: workers read the files and draw every parameter; torchvision's ``decode_jpeg`` decodes
  the batch on the GPU (nvJPEG), crops and resizes there (``F.interpolate``, bilinear, antialiased),
  then as ``split``. Validation as ``split``.
- ``dali``: as ``gpu_decode`` with NVIDIA DALI's decoder (``fn.decoders.image_slice``: the crop's region
  only) and resize, where DALI is installed.
- ``auto`` (default): on CUDA ``dali`` where installed, else ``split`` where the data allows it, else
  ``pil``; on CPU ``pil`` (``split``'s pixels differ slightly from ``pil``'s and its batch half would run
  in the training process).

Every pipeline draws each sample's crop, flip and jitter with torchvision's own ``get_params``, in the
original's order, under the RNGs :class:`~xnorpp.engine.loaders.SeededDataset` seeds from
``(seed, epoch, index)``: a sample gets the same crop, flip and jitter factors under every pipeline and
any number of workers, and a resumed run the same as an uninterrupted one. The split pipelines take
their settings from the dataset's torchvision transform (:func:`read_recipe`): ``data.augment=imagenet``
and ``none`` (train), the resize + centre crop (validation).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import MaybeToTensor
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..registry import Registry
from .decode import EncodedImage, decode_resized_crop, read_encoded, region_decoder_reason
from .device_augment import DeviceAugment, DeviceNormalize
from .folder import load_rgb

__all__ = [
    "PIPELINES",
    "CropRecipe",
    "DeviceDecode",
    "DeviceLoader",
    "EncodedFolder",
    "Pipeline",
    "PipelineSpec",
    "ResizeRecipe",
    "SplitFolder",
    "build_pipeline",
    "read_recipe",
    "resolve_pipeline",
]

log = logging.getLogger(__name__)

BatchTransform = Callable[[Any, torch.device], Tensor]
_DETERMINISTIC = (T.Resize, T.CenterCrop)


# ------------------------------------------------------------------------------------------ recipes
@dataclass(frozen=True)
class CropRecipe:
    """The original's random train transform: random-resized crop, optional flip and colour jitter."""

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    resample: Image.Resampling
    flip: float | None  # flip probability; None: no flip step (and no random draw for it)
    jitter: tuple[Any, Any, Any] | None  # ColorJitter's brightness, contrast, saturation ranges
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def draw(self) -> Tensor:
        """This sample's flip and jitter parameters (:data:`~xnorpp.data.device_augment.PARAMS`), drawn
        as ``RandomHorizontalFlip`` and ``ColorJitter`` draw them, in that order."""
        flip = self.flip is not None and bool(torch.rand(1) < self.flip)
        factors, ops = [1.0, 1.0, 1.0], [0, 1, 2]
        if self.jitter is not None:
            order, *values, _hue = T.ColorJitter.get_params(*self.jitter, None)
            factors = [1.0 if v is None else float(v) for v in values]
            ops = [int(o) for o in order.tolist() if o != 3]
        return torch.tensor([float(flip), *factors, *ops], dtype=torch.float32)


@dataclass(frozen=True)
class ResizeRecipe:
    """A deterministic transform (validation; ``data.augment=none``): PIL steps, then normalisation."""

    steps: T.Compose
    mean: tuple[float, ...]
    std: tuple[float, ...]


def read_recipe(transform: Any) -> CropRecipe | ResizeRecipe:
    """Read a dataset's torchvision transform into what the split pipelines run.

    Raises:
        ValueError: a transform they do not run (the message says which step and what to use instead).
    """
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    if (
        len(steps) < 2
        or not isinstance(steps[-2], (T.ToTensor, MaybeToTensor))
        or not isinstance(steps[-1], T.Normalize)
    ):
        raise ValueError(
            f"the split pipelines need a transform ending in ToTensor and Normalize, got {transform}"
        )
    norm: T.Normalize = steps[-1]
    mean, std = tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)
    head = steps[:-2]
    if head and isinstance(head[0], T.RandomResizedCrop):
        crop, rest = head[0], head[1:]
        flip = rest.pop(0).p if rest and isinstance(rest[0], T.RandomHorizontalFlip) else None
        jitter = rest.pop(0) if rest and isinstance(rest[0], T.ColorJitter) else None
        if jitter is not None and jitter.hue is not None:
            raise ValueError(
                "the split pipelines do not jitter hue (the original's recipe does not): use data.pipeline=pil"
            )
        if rest:
            raise ValueError(_unsupported(rest[0]))
        return CropRecipe(
            size=(int(crop.size[0]), int(crop.size[1])), scale=tuple(crop.scale), ratio=tuple(crop.ratio),
            resample=Image.Resampling(TF.pil_modes_mapping[crop.interpolation]), flip=flip,
            jitter=None if jitter is None else (jitter.brightness, jitter.contrast, jitter.saturation),
            mean=mean, std=std,
        )  # fmt: skip
    for step in head:
        if not isinstance(step, _DETERMINISTIC):
            raise ValueError(_unsupported(step))
    return ResizeRecipe(T.Compose(head), mean, std)


def _unsupported(step: Any) -> str:
    return (
        f"the split pipelines run data.augment=imagenet (random-resized crop, flip, colour jitter) and none, "
        f"not the step {step}: use data.pipeline=pil for this augmentation"
    )


def _extent(height: int, width: int) -> Tensor:
    """A tensor of shape ``1 x height x width`` without memory: what ``get_params`` reads the size from."""
    return torch.empty(1, 1, 1).expand(1, height, width)


def _draw_crop(recipe: CropRecipe, img: EncodedImage) -> tuple[int, int, int, int]:
    """``(top, left, height, width)``: ``RandomResizedCrop``'s draw for this image size."""
    top, left, h, w = T.RandomResizedCrop.get_params(
        _extent(img.height, img.width), list(recipe.scale), list(recipe.ratio)
    )
    return int(top), int(left), int(h), int(w)


# ----------------------------------------------------------------------------------------- datasets
class _FolderView(Dataset):
    """The samples (``(path, label)``) and class names of a folder dataset, under another transform."""

    def __init__(self, folder: Any, recipe: CropRecipe | ResizeRecipe) -> None:
        self.samples: list[tuple[str, int]] = list(folder.samples)
        self.targets: list[int] = [t for _, t in self.samples]
        self.classes = folder.classes
        self.root = folder.root
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.samples)

    def _resized(self, path: str) -> Tensor:
        assert isinstance(self.recipe, ResizeRecipe)
        return torch.from_numpy(np.array(self.recipe.steps(load_rgb(path))))


class SplitFolder(_FolderView):
    """The worker half of ``split``: sample ``i`` is ``((uint8 H x W x 3 crop, params), label)`` for a
    :class:`CropRecipe` and ``(uint8 H x W x 3 image, label)`` for a :class:`ResizeRecipe` (exactly the
    original's pixels: its PIL steps on its PIL decode). ``dct_scaling=False`` decodes at full scale."""

    def __init__(self, folder: Any, recipe: CropRecipe | ResizeRecipe, dct_scaling: bool = True) -> None:
        super().__init__(folder, recipe)
        self.dct_scaling = dct_scaling

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        recipe = self.recipe
        if isinstance(recipe, ResizeRecipe):
            return self._resized(path), target
        img = read_encoded(path)
        box = _draw_crop(recipe, img)
        params = recipe.draw()
        pixels = decode_resized_crop(img, box, recipe.size, self.dct_scaling, recipe.resample)
        return (pixels, params), target


class EncodedFolder(_FolderView):
    """The worker half of ``gpu_decode``/``dali``: sample ``i`` is ``((JPEG bytes, crop box, params),
    label)`` with the box ``(top, left, height, width)``. Files that are not grey or YCbCr JPEGs (PNGs,
    CMYK JPEGs: a handful in ImageNet) are decoded here and sent re-encoded as JPEG (quality 95)."""

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        recipe = self.recipe
        assert isinstance(recipe, CropRecipe)
        img = read_encoded(path)
        box = _draw_crop(recipe, img)
        params = recipe.draw()
        data = img.data
        if not img.jpeg:
            buffer = io.BytesIO()
            load_rgb(path).save(buffer, "JPEG", quality=95)
            data = buffer.getvalue()
        return (data, torch.tensor(box, dtype=torch.int64), params), target


# --------------------------------------------------------------------------------- the device half
def _to(batch: Any, device: torch.device) -> Any:
    return batch.to(device, non_blocking=True) if isinstance(batch, Tensor) else batch


class _OnDevice:
    """Moves the worker's batch to the device (non-blocking: pinned memory on CUDA) and runs ``fn`` there."""

    def __init__(self, fn: Callable[[Any], Tensor]) -> None:
        self.fn = fn

    def __call__(self, batch: Any, device: torch.device) -> Tensor:
        if isinstance(batch, Tensor):
            return self.fn(_to(batch, device))
        return self.fn([_to(b, device) for b in batch])

    def __repr__(self) -> str:
        return repr(self.fn)


class DeviceDecode:
    """The device half of ``gpu_decode``: decode a batch of JPEG bytes with torchvision's ``decode_jpeg``
    on ``device`` (nvJPEG on CUDA), crop each image to its box, resize it to ``size`` (bilinear,
    antialiased, rounded to ``uint8`` as PIL's resize is), then :class:`DeviceAugment`."""

    def __init__(self, size: tuple[int, int], augment: DeviceAugment) -> None:
        self.size, self.augment = size, augment

    def __call__(self, batch: Sequence[Any], device: torch.device) -> Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        datas, boxes, params = batch
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        crops = []
        for image, (top, left, h, w) in zip(images, boxes.tolist(), strict=True):
            crop = image[None, :, top : top + h, left : left + w].float()
            crops.append(
                F.interpolate(crop, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            )
        pixels = torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return self.augment([pixels, params.to(device, non_blocking=True)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, then {self.augment!r})"


class DaliDecode(DeviceDecode):
    """The device half of ``dali``: NVIDIA DALI decodes only each image's crop box
    (``fn.decoders.image_slice``, ``device="mixed"``) and resizes it (``fn.resize``, linear,
    antialiased), one DALI pipeline per batch size; then :class:`DeviceAugment`."""

    def __init__(self, size: tuple[int, int], augment: DeviceAugment, device: torch.device) -> None:
        super().__init__(size, augment)
        self.device = device
        self._pipes: dict[int, Any] = {}

    def _pipe(self, batch_size: int) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        if batch_size not in self._pipes:

            @pipeline_def(
                batch_size=batch_size, num_threads=4, device_id=self.device.index or 0, exec_async=False,
                exec_pipelined=False,
            )  # fmt: skip
            def crops() -> Any:
                jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
                shape = fn.external_source(name="shape", dtype=types.FLOAT)
                images = fn.decoders.image_slice(
                    jpegs, anchor, shape, device="mixed", output_type=types.RGB, normalized_anchor=False,
                    normalized_shape=False,
                )  # fmt: skip
                return fn.resize(
                    images,
                    resize_x=self.size[1],
                    resize_y=self.size[0],
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )

            pipe = crops()
            pipe.build()
            self._pipes[batch_size] = pipe
        return self._pipes[batch_size]

    def __call__(self, batch: Sequence[Any], device: torch.device) -> Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        datas, boxes, params = batch
        pipe = self._pipe(len(datas))
        box = boxes.numpy()
        pipe.feed_input("jpegs", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        pipe.feed_input("anchor", list(box[:, [1, 0]].astype(np.float32)))  # (x, y)
        pipe.feed_input("shape", list(box[:, [3, 2]].astype(np.float32)))  # (width, height)
        (out,) = pipe.run()
        tensor = out.as_tensor()
        pixels = torch.empty(tensor.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(tensor, pixels, cuda_stream=torch.cuda.current_stream(device))
        return self.augment([pixels, params.to(device, non_blocking=True)])


class DeviceLoader:
    """A DataLoader whose batches come out on ``device``, transformed there by ``transform(batch,
    device)``; the next batch is fetched, copied and transformed before the current one is handed out,
    on CUDA on a side stream (the training step's stream waits for it), so the copy and the batch work
    overlap the previous step. ``len``, ``batch_size``, ``dataset`` and ``sampler`` are the loader's."""

    def __init__(self, loader: DataLoader, device: torch.device, transform: BatchTransform) -> None:
        self.loader, self.device, self.transform = loader, device, transform

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = iter(self.loader)
        pending = self._stage(next(batches, None), stream)
        while pending is not None:
            if stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for t in pending:
                    t.record_stream(current)
            ready, pending = pending, self._stage(next(batches, None), stream)
            yield ready

    def _stage(self, batch: Any, stream: Any) -> tuple[Tensor, Tensor] | None:
        if batch is None:
            return None
        inputs, target = batch
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return self.transform(inputs, self.device), target.to(self.device, non_blocking=True)


# -------------------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class Pipeline:
    """Datasets for the workers and the batch transforms that run on the device (``None``: none)."""

    name: str
    train: Dataset
    val: Dataset
    train_batch: BatchTransform | None = None
    val_batch: BatchTransform | None = None

    def wrap(self, train: DataLoader, val: DataLoader, device: torch.device) -> tuple[Any, Any]:
        """The loaders as the training loop iterates them (:class:`DeviceLoader` where there is device work)."""
        return tuple(
            loader if fn is None else DeviceLoader(loader, device, fn)
            for loader, fn in ((train, self.train_batch), (val, self.val_batch))
        )  # type: ignore[return-value]


@dataclass(frozen=True)
class PipelineSpec:
    """A registered pipeline: ``build(train, val, device)``; ``missing(device)`` says why it cannot run
    here (``None``: it can)."""

    name: str
    build: Callable[[Dataset, Dataset, torch.device], Pipeline]
    missing: Callable[[torch.device], str | None]
    about: str


PIPELINES: Registry[PipelineSpec] = Registry(
    "input pipeline", "data.pipeline", "xnorpp.data.pipeline.PIPELINES"
)


def _split_datasets(
    train: Dataset, val: Dataset, name: str
) -> tuple[CropRecipe | ResizeRecipe, ResizeRecipe]:
    for ds in (train, val):
        if not hasattr(ds, "samples") or not hasattr(ds, "transform"):
            raise ValueError(
                f"data.pipeline={name} reads image files: it runs on imagenet and imagefolder data, not on "
                f"{type(ds).__name__}; use data.pipeline=pil (or auto)"
            )
    val_recipe = read_recipe(val.transform)  # type: ignore[attr-defined]
    if not isinstance(val_recipe, ResizeRecipe):
        raise ValueError(f"data.pipeline={name}: the validation transform is random: {val.transform}")  # type: ignore[attr-defined]
    return read_recipe(train.transform), val_recipe  # type: ignore[attr-defined]


def _batch_fns(
    recipe: CropRecipe | ResizeRecipe, val_recipe: ResizeRecipe
) -> tuple[BatchTransform, BatchTransform]:
    val_fn = _OnDevice(DeviceNormalize(val_recipe.mean, val_recipe.std))
    if isinstance(recipe, ResizeRecipe):
        return _OnDevice(DeviceNormalize(recipe.mean, recipe.std)), val_fn
    return _OnDevice(DeviceAugment(recipe.mean, recipe.std)), val_fn


def _build_pil(train: Dataset, val: Dataset, device: torch.device) -> Pipeline:
    return Pipeline("pil", train, val)


def _build_split(train: Dataset, val: Dataset, device: torch.device) -> Pipeline:
    recipe, val_recipe = _split_datasets(train, val, "split")
    reason = region_decoder_reason()
    if reason is not None:
        log.warning(
            "data.pipeline=split: libjpeg-turbo's region decoder is unavailable (%s); PIL decodes", reason
        )
    train_fn, val_fn = _batch_fns(recipe, val_recipe)
    return Pipeline("split", SplitFolder(train, recipe), SplitFolder(val, val_recipe), train_fn, val_fn)


def _build_device_decode(name: str, train: Dataset, val: Dataset, device: torch.device) -> Pipeline:
    recipe, val_recipe = _split_datasets(train, val, name)
    if not isinstance(recipe, CropRecipe):
        raise ValueError(
            f"data.pipeline={name} decodes random crops on the device: use split for data.augment=none"
        )
    augment = DeviceAugment(recipe.mean, recipe.std)
    decode = (
        DaliDecode(recipe.size, augment, device) if name == "dali" else DeviceDecode(recipe.size, augment)
    )
    _, val_fn = _batch_fns(recipe, val_recipe)
    return Pipeline(name, EncodedFolder(train, recipe), SplitFolder(val, val_recipe), decode, val_fn)


def _needs_cuda(name: str, device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"data.pipeline={name} decodes on a CUDA device and this run's device is {device}"
    return None


def _dali_missing(device: torch.device) -> str | None:
    import importlib.util

    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return (
            "data.pipeline=dali needs NVIDIA DALI, which is not installed (pip install "
            "nvidia-dali-cuda120 or the build for your CUDA; see DALI's install guide)"
        )
    return _needs_cuda("dali", device)


PIPELINES.register("pil")(
    PipelineSpec(
        "pil",
        _build_pil,
        lambda d: None,
        "the original: PIL decode and torchvision transforms in the workers",
    )
)
PIPELINES.register("split")(
    PipelineSpec(
        "split",
        _build_split,
        lambda d: None,
        "workers decode the crop's region to uint8; flip, jitter, normalise on the device",
    )
)
PIPELINES.register("gpu_decode")(
    PipelineSpec(
        "gpu_decode", lambda t, v, d: _build_device_decode("gpu_decode", t, v, d), lambda d: _needs_cuda("gpu_decode", d),
        "torchvision's decode_jpeg on CUDA (nvJPEG), crop and resize on the device, then as split",
    )
)  # fmt: skip
PIPELINES.register("dali")(
    PipelineSpec(
        "dali",
        lambda t, v, d: _build_device_decode("dali", t, v, d),
        _dali_missing,
        "NVIDIA DALI decodes the crop's region on the GPU, then as split",
    )
)


def resolve_pipeline(name: str | None, device: torch.device, train: Dataset) -> tuple[str, str]:
    """``(pipeline, reason)`` for a ``data.pipeline`` value (``None``/``auto``: the default for the device)."""
    text = "auto" if name is None else str(name).strip().lower()
    if text != "auto":
        spec = PIPELINES.get(text)  # an unknown name lists the choices
        missing = spec.missing(device)
        if missing is not None:
            available = [n for n, s in PIPELINES.items() if s.missing(device) is None]
            raise ValueError(f"{missing}. Available here: {', '.join(available)} (or auto)")
        return text, f"data.pipeline={text}"
    if device.type != "cuda":
        return (
            "pil",
            "data.pipeline=auto on CPU: pil (split's pixels differ slightly and its batch work would run in the training process)",
        )
    if not hasattr(train, "samples"):
        return "pil", "data.pipeline=auto: pil (the split pipelines read image files; this data is in memory)"
    if _dali_missing(device) is None:
        return "dali", "data.pipeline=auto on CUDA: dali (installed)"
    return "split", "data.pipeline=auto on CUDA: split (DALI is not installed)"


def build_pipeline(name: str | None, train: Dataset, val: Dataset, device: torch.device) -> Pipeline:
    """The :class:`Pipeline` ``data.pipeline`` names, built on the datasets of :func:`~xnorpp.data.build_datasets`.

    Raises:
        ValueError: an unknown name (the message lists :data:`PIPELINES`), a pipeline that cannot run here
            (missing package, not CUDA: the message says which, and what is available), or data or an
            augmentation the chosen pipeline does not run.
    """
    chosen, reason = resolve_pipeline(name, device, train)
    try:
        pipeline = PIPELINES[chosen].build(train, val, device)
    except ValueError as e:
        if chosen == "pil" or (name is not None and str(name).strip().lower() != "auto"):
            raise
        chosen, reason = "pil", f"data.pipeline=auto: pil, as {e}"
        pipeline = PIPELINES[chosen].build(train, val, device)
    log.info("input pipeline %s (%s)", chosen, reason)
    return pipeline
