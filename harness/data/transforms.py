"""Joint image/mask transforms for file-backed segmentation sources (folder, voc, cityscapes).

A training sample's augmentation is two steps: ``draw_params`` draws its random parameters (scale factor,
crop box, flip, colour-jitter factors and order) from a ``torch.Generator`` (or the global generator, which
DataLoader seeds per worker from the trainer's generator), and ``apply_params`` applies given parameters to
the image and mask, deterministically. So an augmentation can be stored (``AugmentParams.as_dict``) and
replayed bit for bit, and the same generator state always draws the same parameters.

Order: the fixed ``resize`` (every split), then the random scale (train), the crop (random box for train,
centre box for val/test unless ``crop_eval: false``), where the box extends past the scaled image the image
is padded with ``pad`` and the mask with the ignore index (bottom/right, as CIRKD pads), the flip, colour
jitter (train; image only), conversion to float in [0, 1] (uint8 divided by 255) and ImageNet normalisation
(``normalize``). Images are resized bilinearly (antialiased when shrinking), masks by nearest neighbour at
pixel centres (``nearest-exact``), so labels are never blended and stay aligned with the image.

Also here: ``PairView``, the Dataset those sources return: it reads (image, mask) pairs from a base dataset
at chosen indices (images as PIL images or (C, H, W) tensors, uint8 or float in [0, 1]), applies the
transform and an optional label lookup table, and says whether its samples are ``deterministic`` (the
trainer caches teacher outputs only when they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from harness.data.base import IGNORE_INDEX

# ImageNet statistics; for one channel, the mean of the three.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
# Fields added after configs were first hashed: left out of dumps at these values (their "off" settings),
# so earlier configs keep their hash.
_LATER_DEFAULTS = {"scale": None, "scale_step": None, "crop_eval": True, "pad": 0.0}


class AugmentConfig(BaseModel):
    """Resize and crop sizes are (height, width); a single int means a square, so batches always stack
    (unlike torchvision's ``Resize(int)``, which keeps the aspect ratio)."""

    model_config = ConfigDict(extra="forbid")
    resize: int | tuple[int, int] | None = Field(None, description="resize every split to this size first")
    scale: tuple[float, float] | None = Field(
        None, description="random scale (train only): the resized image times a factor in [low, high]"
    )
    scale_step: float | None = Field(
        None, gt=0, description="draw the scale from low, low+step, ..., high (CIRKD: 0.1); unset: uniformly"
    )
    crop: int | tuple[int, int] | None = Field(
        None, description="random crop (train) / centre crop (val, test); padded where the image is smaller"
    )
    crop_eval: bool = Field(True, description="false: val and test are not cropped (whole images)")
    pad: float | list[float] = Field(
        0.0,
        description="image value(s) in [0, 1] where a crop extends past the image; masks get the ignore index",
    )
    hflip: bool = Field(False, description="random horizontal flip (train only)")
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="brightness/contrast/saturation strength (train only); 0 = off"
    )
    normalize: bool = Field(
        False, description="subtract ImageNet mean, divide by std (one channel: their averages)"
    )

    @field_validator("resize", "crop")
    @classmethod
    def _positive(cls, value):
        sizes = (value,) if isinstance(value, int) else (value or ())
        if any(s < 1 for s in sizes):
            raise ValueError("sizes must be positive")
        return value

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value):
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError(f"scale {list(value)} must be [low, high] with 0 < low <= high, e.g. [0.5, 2.0]")
        return value

    @field_validator("pad")
    @classmethod
    def _pad_range(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values or any(not 0 <= v <= 1 for v in values):
            raise ValueError("pad values are image intensities in [0, 1], one or one per channel")
        return value

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.resize is not None and self.crop is not None and self.scale is None:
            rh, rw = _pair(self.resize)
            ch, cw = _pair(self.crop)
            if ch > rh or cw > rw:
                raise ValueError(f"crop {self.crop} is larger than resize {self.resize}; make crop <= resize")
        if self.scale_step is not None and self.scale is None:
            raise ValueError("scale_step needs scale: [low, high]; set both or neither")
        return self

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler):
        data = handler(self)
        for key, default in _LATER_DEFAULTS.items():
            if isinstance(data, dict) and key in data and data[key] == default:
                del data[key]
        return data

    @property
    def random(self) -> bool:
        """True when the train transform draws random numbers (so the train split's inputs vary per epoch)."""
        return self.crop is not None or self.scale is not None or self.hflip or self.color_jitter > 0

    @property
    def fixed_size(self) -> bool:
        """True when every split's outputs have one size whatever the input's size."""
        return self.resize is not None or (self.crop is not None and self.crop_eval)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class AugmentParams:
    """Everything ``apply_params`` needs to redo one sample's transform.

    ``size``: (h, w) the image is resized to (the fixed resize times the scale); ``box``: (top, left, height,
    width) of the crop in that resized image, which may extend past it (padded); ``flip``: mirrored left-right
    after the crop; ``jitter``: brightness, contrast, saturation factors (1 = unchanged), applied in
    ``jitter_order`` (0 brightness, 1 contrast, 2 saturation)."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False
    scale: float = 1.0
    jitter: tuple[float, float, float] = (1.0, 1.0, 1.0)
    jitter_order: tuple[int, int, int] = (0, 1, 2)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentParams:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=generator))


def draw_scale(cfg: AugmentConfig, generator: torch.Generator | None) -> float:
    low, high = cfg.scale
    if cfg.scale_step is None:
        return _uniform(low, high, generator)
    steps = int(round((high - low) / cfg.scale_step + 1e-9))
    return min(high, low + _randint(steps, generator) * cfg.scale_step)


def draw_params(
    cfg: AugmentConfig, size: tuple[int, int], generator: torch.Generator | None = None, in_channels: int = 3
) -> AugmentParams:
    """The random parameters of one training sample whose image is ``size`` = (h, w), drawn in a fixed
    order (scale, crop offsets, flip, jitter) from ``generator`` (None: torch's global generator)."""
    h, w = _pair(cfg.resize) if cfg.resize is not None else size
    scale = 1.0
    if cfg.scale is not None:
        scale = draw_scale(cfg, generator)
        h, w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    box = (0, 0, h, w)
    if cfg.crop is not None:
        ch, cw = _pair(cfg.crop)
        box = (_randint(max(h - ch, 0), generator), _randint(max(w - cw, 0), generator), ch, cw)
    flip = cfg.hflip and bool(torch.rand((), generator=generator) < 0.5)
    jitter, order = (1.0, 1.0, 1.0), (0, 1, 2)
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        b, c = _uniform(max(0.0, 1 - j), 1 + j, generator), _uniform(max(0.0, 1 - j), 1 + j, generator)
        s = _uniform(max(0.0, 1 - j), 1 + j, generator) if in_channels == 3 else 1.0
        jitter = (b, c, s)
        order = tuple(int(i) for i in torch.randperm(3, generator=generator))
    return AugmentParams((h, w), box, flip, scale, jitter, order)


def _centre(n: int, crop: int) -> int:
    """torchvision's centre-crop offset; negative when the image is smaller (padded on both sides)."""
    return int(round((n - crop) / 2.0)) if n >= crop else -((crop - n) // 2)


def eval_params(cfg: AugmentConfig, size: tuple[int, int]) -> AugmentParams:
    """The deterministic val/test parameters: the fixed resize and, with ``crop_eval``, the centre crop."""
    h, w = _pair(cfg.resize) if cfg.resize is not None else size
    box = (0, 0, h, w)
    if cfg.crop is not None and cfg.crop_eval:
        ch, cw = _pair(cfg.crop)
        box = (_centre(h, ch), _centre(w, cw), ch, cw)
    return AugmentParams((h, w), box)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest neighbour at pixel centres (PyTorch's ``nearest-exact``) by indexing: any dtype, no blending."""
    (h, w), (oh, ow) = mask.shape[-2:], size
    rows = ((torch.arange(oh, dtype=torch.float64) + 0.5) * (h / oh)).long().clamp_(max=h - 1)
    cols = ((torch.arange(ow, dtype=torch.float64) + 0.5) * (w / ow)).long().clamp_(max=w - 1)
    return mask[..., rows[:, None], cols[None, :]]


def crop_padded(t: torch.Tensor, box: tuple[int, int, int, int], fill) -> torch.Tensor:
    """The (..., bh, bw) window of ``t`` at ``box``; where it lies outside ``t``, ``fill`` (scalar or per
    channel)."""
    top, left, bh, bw = box
    h, w = t.shape[-2:]
    if top >= 0 and left >= 0 and top + bh <= h and left + bw <= w:
        return t[..., top : top + bh, left : left + bw]
    out = torch.empty((*t.shape[:-2], bh, bw), dtype=t.dtype)
    out[...] = torch.as_tensor(fill, dtype=t.dtype).reshape(-1, 1, 1) if t.dim() == 3 else fill
    r0, r1, c0, c1 = max(top, 0), min(top + bh, h), max(left, 0), min(left + bw, w)
    if r0 < r1 and c0 < c1:
        out[..., r0 - top : r1 - top, c0 - left : c1 - left] = t[..., r0:r1, c0:c1]
    return out


def _pad_fill(pad: float | list[float], image: torch.Tensor) -> list[float]:
    values = pad if isinstance(pad, list) else [pad]
    channels = image.shape[0]
    if len(values) not in (1, channels):
        raise ValueError(f"augment.pad has {len(values)} values but the image has {channels} channels")
    values = values * channels if len(values) == 1 else values
    return [round(v * 255) for v in values] if image.dtype == torch.uint8 else values


_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def apply_params(
    image: torch.Tensor,
    mask: torch.Tensor,
    params: AugmentParams,
    pad: float | list[float] = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (C, H, W, uint8 or float) and ``mask`` (H, W) transformed by ``params``: the same output for
    the same inputs every time. Returns them in their input dtypes (conversion to float is the caller's)."""
    if tuple(image.shape[-2:]) != params.size:
        image = TF.resize(image, list(params.size), antialias=True)
        mask = resize_mask(mask, params.size)
    image = crop_padded(image, params.box, _pad_fill(pad, image))
    mask = crop_padded(mask, params.box, ignore_index)
    if params.flip:
        image, mask = image.flip(-1), mask.flip(-1)
    for k in params.jitter_order:
        if params.jitter[k] != 1.0 and (k < 2 or image.shape[0] == 3):
            image = _JITTER[k](image, params.jitter[k])
    return image, mask


class JointTransform:
    """Callable (PIL image or C,H,W tensor, PIL or array mask) -> (float image C,H,W, long mask H,W).
    uint8 images are divided by 255, float ones kept. Train transforms draw their parameters per call
    (``draw``), val/test ones use the fixed ``eval_params``. Picklable, so it works in DataLoader workers."""

    def __init__(self, cfg: AugmentConfig, train: bool, in_channels: int, ignore_index: int = IGNORE_INDEX):
        self.cfg, self.train, self.in_channels, self.ignore_index = cfg, train, in_channels, ignore_index
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
        self.mean, self.std = list(mean), list(std)

    def draw(self, size: tuple[int, int], generator: torch.Generator | None = None) -> AugmentParams:
        if not self.train:
            return eval_params(self.cfg, size)
        return draw_params(self.cfg, size, generator, self.in_channels)

    def apply(self, image, mask, params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor]:
        img, target = self.as_tensors(image, mask)
        img, target = apply_params(img, target, params, self.cfg.pad, self.ignore_index)
        img = TF.to_dtype(img, torch.float32, scale=True)
        if self.cfg.normalize:
            img = TF.normalize(img, self.mean, self.std)
        return img, target

    @staticmethod
    def as_tensors(image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        img = image if torch.is_tensor(image) else TF.pil_to_tensor(image)
        return img, torch.from_numpy(np.array(mask, dtype=np.int64))

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(image.shape[-2:]) if torch.is_tensor(image) else (image.height, image.width)
        return self.apply(image, mask, self.draw(size))


def build_transform(
    cfg: AugmentConfig, train: bool, in_channels: int, ignore_index: int = IGNORE_INDEX
) -> JointTransform:
    """The joint transform for one split: augmentation for train, resize/centre-crop only otherwise."""
    return JointTransform(cfg, train, in_channels, ignore_index)


class PairView(Dataset):
    """Samples ``indices`` of a base dataset of (image, mask) pairs, transformed.

    ``label_map`` (a 256-entry long tensor) maps raw mask values to class ids after the transform (a
    pointwise map commutes with nearest resizing, crops and flips; padding uses the ignore value, which the
    map must send to itself).
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        transform: JointTransform,
        deterministic: bool,
        label_map: torch.Tensor | None = None,
    ):
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.deterministic = deterministic
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(i)

    def image_size(self, i: int) -> tuple[int, int]:
        """(h, w) of sample ``i``'s image as read (before any transform)."""
        image, _ = self.base[self.indices[i]]
        return tuple(image.shape[-2:]) if torch.is_tensor(image) else (image.height, image.width)

    def view(self, i: int, params: AugmentParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``i`` transformed by ``params`` (stored parameters, replayed exactly), or by parameters the
        transform draws now (None)."""
        image, mask = self.base[self.indices[i]]
        x, y = self.transform(image, mask) if params is None else self.transform.apply(image, mask, params)
        if self.label_map is not None:
            y = self.label_map[y.clamp(0, len(self.label_map) - 1)]
        return x, y


def alternate_halves(n: int) -> tuple[list[int], list[int]]:
    """Split indices 0..n-1 into two interleaved halves: even positions, odd positions."""
    return list(range(0, n, 2)), list(range(1, n, 2))


# One view's AugmentParams as a row of float64 (ints and Python floats both exact in it), for storing views.
PARAM_FIELDS = (
    *("size_h", "size_w", "top", "left", "crop_h", "crop_w", "flip", "scale"),
    *("brightness", "contrast", "saturation", "order_0", "order_1", "order_2"),
)


def params_row(p: AugmentParams) -> list[float]:
    """``p`` as the values of :data:`PARAM_FIELDS`."""
    return [*map(float, (*p.size, *p.box, p.flip, p.scale, *p.jitter, *p.jitter_order))]


def row_params(row) -> AugmentParams:
    """The AugmentParams a :func:`params_row` row holds, bit for bit."""
    v = [float(x) for x in row]
    ints = [int(x) for x in v]
    return AugmentParams(
        (ints[0], ints[1]), tuple(ints[2:6]), bool(ints[6]), v[7], tuple(v[8:11]), tuple(ints[11:14])
    )
