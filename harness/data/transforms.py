"""Joint image/mask transforms for file-backed segmentation sources (folder, voc, cityscapes).

Built with ``torchvision.transforms.v2``: the image is wrapped as ``tv_tensors.Image`` and the mask as
``tv_tensors.Mask``, so every geometric op (resize, crop, flip) moves both alike, masks are always resized
with nearest-neighbour interpolation, and photometric ops (colour jitter, normalisation) touch the image only.
The train split gets the random augmentation; val and test only the deterministic resize and centre crop.

Also here: ``PairView``, the Dataset those sources return: it reads (image, mask) pairs from a base dataset
at chosen indices (images as PIL images or (C, H, W) tensors, uint8 or float in [0, 1]), applies the
transform and an optional label lookup table, and says whether its samples are ``deterministic`` (the
trainer caches teacher outputs only when they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from harness.data.base import IGNORE_INDEX

# ImageNet statistics; for one channel, the mean of the three.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)


class AugmentConfig(BaseModel):
    """Resize and crop sizes are (height, width); a single int means a square, so batches always stack
    (unlike torchvision's ``Resize(int)``, which keeps the aspect ratio)."""

    model_config = ConfigDict(extra="forbid")
    resize: int | tuple[int, int] | None = Field(None, description="resize every split to this size first")
    crop: int | tuple[int, int] | None = Field(
        None, description="random crop (train) / centre crop (val, test)"
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

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.resize is not None and self.crop is not None:
            rh, rw = _pair(self.resize)
            ch, cw = _pair(self.crop)
            if ch > rh or cw > rw:
                raise ValueError(f"crop {self.crop} is larger than resize {self.resize}; make crop <= resize")
        return self

    @property
    def random(self) -> bool:
        """True when the train transform draws random numbers (so the train split's inputs vary per epoch)."""
        return self.crop is not None or self.hflip or self.color_jitter > 0

    @property
    def fixed_size(self) -> bool:
        """True when every output has the same size whatever the input's size."""
        return self.resize is not None or self.crop is not None


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class JointTransform:
    """Callable (PIL image or C,H,W tensor, PIL or array mask) -> (float image C,H,W, long mask H,W).
    uint8 images are divided by 255, float ones kept. Picklable, so it works in DataLoader worker processes."""

    def __init__(self, cfg: AugmentConfig, train: bool, in_channels: int, ignore_index: int = IGNORE_INDEX):
        ops: list[Any] = []
        if cfg.resize is not None:
            ops.append(v2.Resize(_pair(cfg.resize), antialias=True))
        if cfg.crop is not None:
            crop = _pair(cfg.crop)
            if train:
                fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
                ops.append(v2.RandomCrop(crop, pad_if_needed=True, fill=fill))
            else:
                ops.append(v2.CenterCrop(crop))
        if train and cfg.hflip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        if train and cfg.color_jitter > 0:
            j = cfg.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if in_channels == 3 else 0))
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        if cfg.normalize:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
            ops.append(v2.Normalize(mean=list(mean), std=list(std)))
        self.pipeline = v2.Compose(ops)

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        img = tv_tensors.Image(v2.functional.pil_to_tensor(image) if not torch.is_tensor(image) else image)
        target = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
        img, target = self.pipeline(img, target)
        return img.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor)


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
        image, mask = self.base[self.indices[i]]
        x, y = self.transform(image, mask)
        if self.label_map is not None:
            y = self.label_map[y.clamp(0, len(self.label_map) - 1)]
        return x, y


def alternate_halves(n: int) -> tuple[list[int], list[int]]:
    """Split indices 0..n-1 into two interleaved halves: even positions, odd positions."""
    return list(range(0, n, 2)), list(range(1, n, 2))
