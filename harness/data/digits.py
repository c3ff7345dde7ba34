"""scikit-learn's UCI handwritten digits as a classification set (1,797 images, 8x8, 10 classes).

Ships with scikit-learn, so it needs no download: the quickest classification source. Pixel values 0..16
are scaled to [0, 1]. The images are split once into train/val/test, stratified and seeded. Set
``image_size: 28`` to upsample them (bilinear) to the 784-input MLPs of seed 003.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.data._splits import classification_splits, stratified_split
from harness.data.base import DATA, DataConfigBase, DataSplits, Normalization, TensorSplit


class DigitsConfig(DataConfigBase):
    source: Literal["digits"] = "digits"
    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train, val, test shares")
    image_size: int = Field(
        8, ge=8, le=256, description="side in pixels; above 8 the digits are upsampled bilinearly"
    )
    normalize: bool | Normalization = Field(
        False,
        description="true: standardise each channel with the training split's mean and std; "
        "or {mean: [...], std: [...]}",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must be three positive shares summing to 1, got {list(self.fractions)}"
            )
        return self


@DATA.register(DigitsConfig)
def load_digits_classification(cfg: DigitsConfig) -> DataSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8
    if cfg.image_size != 8:
        size = (cfg.image_size, cfg.image_size)
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    parts = stratified_split(bunch.target, cfg.fractions, cfg.seed)
    splits = [TensorSplit(images[torch.from_numpy(idx)], targets[torch.from_numpy(idx)]) for idx in parts]
    return classification_splits(splits, [str(d) for d in range(10)], cfg.normalize)


def split_indices(cfg: DigitsConfig) -> list[np.ndarray]:
    """Indices into ``load_digits()`` behind each split (train, val, test), for checks and provenance."""
    from sklearn.datasets import load_digits

    return stratified_split(load_digits().target, cfg.fractions, cfg.seed)
