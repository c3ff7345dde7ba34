"""``data.normalize``: per-channel mean/std applied to every split's images, and how a config's input
normalisation is described (the teacher check compares these descriptions).

In-memory splits are normalised once at load time; any other split is wrapped so each sample is normalised
as it is read (after the source's own transform).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from harness.data.base import DataSplits, Normalization, TensorSplit
from harness.data.transforms import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from harness.errors import DataError


class NormalizedView(Dataset):
    """Samples of ``base`` with ``(x - mean) / std`` applied to the image."""

    def __init__(self, base: Dataset, mean: torch.Tensor, std: torch.Tensor):
        self.base, self.mean, self.std = base, mean, std

    @property
    def deterministic(self) -> bool:
        return getattr(self.base, "deterministic", False)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x - self.mean) / self.std, y


def normalize_splits(data: DataSplits, norm: Normalization) -> DataSplits:
    """``data`` with every split's images normalised by ``norm`` (one value per input channel)."""
    if len(norm.mean) != data.in_channels:
        raise DataError(
            f"data.normalize gives {len(norm.mean)} mean/std values but the data has {data.in_channels} input "
            "channel(s); give one per channel"
        )
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if isinstance(split, TensorSplit):
            m, s = mean.to(split.images.device), std.to(split.images.device)
            split = TensorSplit((split.images - m) / s, split.targets)
        else:
            split = NormalizedView(split, mean, std)
        setattr(data, name, split)
    return data


def describe_normalization(data_cfg: dict, in_channels: int) -> str:
    """The input normalisation a dumped data config asks for, in words; equal settings read the same."""
    norm = data_cfg.get("normalize")
    if norm is True:
        return "each channel standardised by the training split's mean and std"
    if isinstance(norm, dict):
        mean, std = norm["mean"], norm["std"]
    elif (data_cfg.get("augment") or {}).get("normalize"):
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    else:
        return "none"
    return f"mean {[round(float(v), 6) for v in mean]} std {[round(float(v), 6) for v in std]}"
