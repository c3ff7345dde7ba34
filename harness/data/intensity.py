"""Images of any bit depth read without clipping, and their intensities scaled to [0, 1] (``data.intensity``).

Pillow's ``convert("L")`` clips values above 255, so a 12- or 16-bit image turned all white. Here 8-bit
files are read by Pillow as before (palettes resolved, RGB <-> grayscale by Pillow's luma; the transform
divides by 255). Deeper files keep their values: 16-bit PNGs through Pillow, TIFFs through tifffile
(Pillow when the TIFF is 8-bit or compressed with a codec tifffile lacks without ``imagecodecs``, e.g.
LZW). Their pixels are scaled, then converted to the asked channels (gray copied to RGB; RGB to gray by the
luma 0.299 R + 0.587 G + 0.114 B; an alpha plane dropped):

* ``mode: dtype`` (default): by the range of the file's integer type, (x - min) / (max - min): x / 65535
  for uint16, x / 255 for uint8 (the same as before). A 12-bit camera's values stored in 16 bits end up in
  [0, 4095 / 65535]: not clipped, but dark; use ``percentile`` or ``data.normalize`` for those. Float
  images have no such range: use ``percentile``.
* ``mode: percentile``: per image, over all its pixels and channels, lo and hi are its ``low`` and ``high``
  percentiles (default 1 and 99.8, CSBDeep's); x -> clip((x - lo) / (hi - lo), 0, 1). A constant image
  gives 0. Taken on the whole file, before resizing and cropping, so a crop does not change it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.errors import DataError

TIFF = (".tif", ".tiff")
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow's modes for more than 8 bits a sample
PIL_MODE = {1: "L", 3: "RGB"}
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class IntensityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["dtype", "percentile"] = Field(
        "dtype", description="dtype: by the integer type's range; percentile: per image, low..high -> 0..1"
    )
    low: float = Field(1.0, ge=0, lt=100, description="percentile mode: the percentile mapped to 0")
    high: float = Field(99.8, gt=0, le=100, description="percentile mode: the percentile mapped to 1")

    @model_validator(mode="after")
    def _order(self):
        if self.low >= self.high:
            raise ValueError(f"intensity.low {self.low} must be below intensity.high {self.high}")
        return self


def scale_intensity(array: np.ndarray, cfg: IntensityConfig) -> np.ndarray:
    """float32 copy of ``array`` scaled to [0, 1] as ``cfg`` says (see the module docstring)."""
    x = array.astype(np.float64)
    if cfg.mode == "dtype":
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"{array.dtype} pixels have no fixed range to scale by; set data.intensity.mode: percentile"
            )
        info = np.iinfo(array.dtype)
        return ((x - info.min) / (info.max - info.min)).astype(np.float32)
    lo, hi = np.percentile(x, [cfg.low, cfg.high])
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _planes(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 1) or (H, W, 3): grayscale gets a channel axis, an alpha plane is dropped."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        return array
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        return array[..., :-1]
    raise DataError(
        f"{path}: image has shape {tuple(array.shape)}; expected (H, W) grayscale or (H, W, 3) RGB: save one "
        "2-D plane or one RGB image per file (split stacks and channels-first TIFFs)"
    )


def _to_channels(planes: np.ndarray, channels: int) -> np.ndarray:
    if planes.shape[-1] == channels:
        return planes
    if channels == 3:
        return np.repeat(planes, 3, axis=-1)
    return (planes @ LUMA)[..., None]


def _deep_pixels(path: Path) -> np.ndarray | None:
    """The stored pixels of a file deeper than 8 bits a sample; None for 8-bit files (Pillow reads those)."""
    if path.suffix.lower() in TIFF:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            if tif.pages[0].dtype not in (np.uint8, np.bool_):
                try:
                    return tif.asarray()
                except ValueError as exc:  # a codec that needs imagecodecs: Pillow decodes the common ones
                    if "imagecodecs" not in str(exc):
                        raise
    with Image.open(path) as im:
        return np.array(im) if im.mode in DEEP_MODES else None


def read_image(path: Path, channels: int, cfg: IntensityConfig) -> torch.Tensor:
    """An image file as (channels, H, W): uint8 for 8-bit files in ``dtype`` mode (the transform scales them,
    as it always has), float32 in [0, 1] otherwise."""
    deep = _deep_pixels(path)
    if deep is None:
        with Image.open(path) as im:
            pixels = np.array(im.convert(PIL_MODE[channels])).reshape(im.height, im.width, channels)
        if cfg.mode != "dtype":
            pixels = scale_intensity(pixels, cfg)
    else:
        try:
            pixels = _to_channels(scale_intensity(_planes(deep, path), cfg), channels)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()


def read_mask(path: Path) -> np.ndarray:
    """A mask file's stored values (any bit depth; palette PNGs give their indices)."""
    deep = _deep_pixels(path)
    if deep is not None:
        return deep
    with Image.open(path) as m:
        return np.array(m)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header."""
    if path.suffix.lower() in TIFF:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagelength), int(page.imagewidth)
    with Image.open(path) as im:
        return im.height, im.width
