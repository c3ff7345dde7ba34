"""The embedded default: segmentation canvases composed from scikit-learn's UCI handwritten digits.

Built the way M2NIST is: a few real digits, each scaled up and pasted without overlap on a blank canvas.
Every ink pixel (intensity above `ink_threshold`) is labelled with its digit's class (background 0, digit
d -> d + 1); the `boundary`-pixel ring around the ink is labelled 255 (ignored), as VOC does with its object
boundaries, and everything else is background. `binary: true` keeps the same pixels but labels every digit
1: foreground against background, the analogue of seed 002's mitochondria task. The source digits of
train, val and test are disjoint, so a test canvas never shows a digit image seen in training. The same
config and seed always give the same tensors.

Shares of the training pixels at the defaults (64x64, 1-3 digits, ink_threshold 0.2, seed 0): background
0.838, digit 0.117, ignored 0.045 with boundary 1; background 0.883, digit 0.117 with boundary 0. Measured
with the command in docs/digits_seg.md.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.data.base import DATA, DataConfigBase, DataSplits, TensorSplit, ignore_ring
from harness.data.device_augment import TensorAugmentConfig, augment_field


class DigitsSegConfig(DataConfigBase):
    source: Literal["digits_seg"] = "digits_seg"
    image_size: int = Field(64, ge=16, le=512)
    min_digits: int = Field(1, ge=1)
    max_digits: int = Field(3, ge=1)
    digit_scale: tuple[float, float] = (0.25, 0.45)
    train: int = Field(1000, ge=1)
    val: int = Field(200, ge=1)
    test: int = Field(200, ge=1)
    seed: int = 0
    ink_threshold: float = Field(0.2, gt=0, lt=1)  # intensity in [0, 1] above which a pixel is ink
    boundary: int = Field(1, ge=0, le=1)  # width in pixels of the ignored ring around the ink
    binary: bool = False  # 2 classes: background, digit
    augment: TensorAugmentConfig | None = augment_field()  # random views on the device (train only)

    @model_validator(mode="after")
    def _check(self):
        if self.max_digits < self.min_digits:
            raise ValueError("max_digits must be >= min_digits")
        lo, hi = self.digit_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("digit_scale must be two fractions of the canvas, 0 < low <= high <= 1")
        return self


def _source_digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)  # 1797 x 8 x 8 in [0, 1]
    return images, bunch.target.astype(np.int64)


def _split_sources(n_sources: int, counts: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint pools of source-digit indices, sized in proportion to each split's canvas count."""
    order = rng.permutation(n_sources)
    shares = np.array(counts, dtype=np.float64) / sum(counts)
    bounds = np.concatenate([[0], np.cumsum(np.maximum(1, np.round(shares * n_sources)).astype(int))])
    bounds[-1] = n_sources
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(counts))]


def _compose(
    cfg: DigitsSegConfig, n: int, pool: np.ndarray, digits: torch.Tensor, labels: np.ndarray, rng
) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.image_size
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        occupied: list[tuple[int, int, int]] = []  # (row, col, side) of pasted digits
        for _ in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
            side = int(round(size * rng.uniform(*cfg.digit_scale)))
            spot = _free_spot(side, size, occupied, rng)
            if spot is None:
                break
            r, c = spot
            occupied.append((r, c, side))
            src = int(rng.choice(pool))
            glyph = F.interpolate(
                digits[src][None, None], size=(side, side), mode="bilinear", align_corners=False
            )[0, 0]
            glyph = glyph.clamp(0, 1)
            images[i, 0, r : r + side, c : c + side] = glyph
            masks[i, r : r + side, c : c + side][glyph > cfg.ink_threshold] = int(labels[src]) + 1
    return images, _finish_labels(cfg, masks)


def _finish_labels(cfg: DigitsSegConfig, masks: torch.Tensor) -> torch.Tensor:
    """Ignore the `boundary`-pixel ring around the ink (never ink itself); collapse digits if binary."""
    ink = masks > 0
    ignore_ring(masks, cfg.boundary)
    if cfg.binary:
        masks[ink] = 1
    return masks


def _free_spot(side: int, size: int, occupied, rng, tries: int = 50):
    for _ in range(tries):
        r, c = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(r + side <= r2 or r2 + s2 <= r or c + side <= c2 or c2 + s2 <= c for r2, c2, s2 in occupied):
            return r, c
    return None


@DATA.register(DigitsSegConfig)
def load_digits_seg(cfg: DigitsSegConfig) -> DataSplits:
    digits, labels = _source_digits()
    rng = np.random.default_rng(cfg.seed)
    counts = [cfg.train, cfg.val, cfg.test]
    pools = _split_sources(len(digits), counts, rng)
    names = ["background", "digit"] if cfg.binary else ["background"] + [f"digit {d}" for d in range(10)]
    splits = [TensorSplit(*_compose(cfg, n, pool, digits, labels, rng)) for n, pool in zip(counts, pools)]
    return DataSplits(
        task="segmentation",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=2 if cfg.binary else 11,
        in_channels=1,
        class_names=names,
    )


def source_pools(cfg: DigitsSegConfig) -> list[np.ndarray]:
    """The source-digit indices behind each split (train, val, test), for checks and provenance."""
    rng = np.random.default_rng(cfg.seed)
    return _split_sources(len(_source_digits()[0]), [cfg.train, cfg.val, cfg.test], rng)
