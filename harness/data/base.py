"""What every data source returns: three splits, the task, and the label space."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from torch.utils.data import Dataset

from harness.registry import Registry

DATA = Registry("data source", "source")
IGNORE_INDEX = 255
QUALITY = {"segmentation": "miou", "classification": "accuracy"}  # the metric each task is judged by


def quality_metric(task: str) -> str:
    """``miou`` or ``accuracy``: logged as ``val/<it>`` and ``test/<it>``, the default objective."""
    return QUALITY[task]


def task_of(metric_names) -> str:
    """The task whose quality metric is among logged metric names (``test/accuracy``, ``metrics.val/miou``)."""
    for task, metric in QUALITY.items():
        if any(str(name).endswith(f"/{metric}") for name in metric_names):
            return task
    return "segmentation"


class Normalization(BaseModel):
    """Per-channel input normalisation, ``(x - mean) / std`` on images scaled to [0, 1]."""

    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"mean has {len(self.mean)} values but std {len(self.std)}; give one per channel"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class DataConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: Normalization | None = Field(
        None,
        description="{mean: [...], std: [...]} per input channel, applied to every split's images; "
        "a teacher's is recorded with it and a student must use the same",
    )

    @model_validator(mode="after")
    def _one_normalization(self):
        augment = getattr(self, "augment", None)
        if isinstance(self.normalize, Normalization) and getattr(augment, "normalize", False):
            raise ValueError("set data.normalize or data.augment.normalize (ImageNet statistics), not both")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_normalize(self, handler):
        # Unset normalize is left out of dumps, so configs (and their hashes) read as before the field existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("normalize") is None:
            data.pop("normalize", None)
        return data


def ignore_ring(masks: torch.Tensor, width: int) -> torch.Tensor:
    """``masks`` (N, H, W) with the ``width``-pixel ring around the foreground (labels > 0) set to
    IGNORE_INDEX, as VOC does with its object boundaries; foreground pixels are never changed."""
    if not width:
        return masks
    fg = masks > 0
    near = F.max_pool2d(fg[:, None].float(), 2 * width + 1, stride=1, padding=width)[:, 0] > 0
    masks[near & ~fg] = IGNORE_INDEX
    return masks


class TensorSplit(Dataset):
    """A split held as two tensors (images N,C,H,W float; targets N,H,W or N long).

    Small datasets live whole on the training device: the trainer slices batches from them directly,
    with no per-sample Python work.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    def to(self, device) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.targets.to(device))


@dataclass
class DataSplits:
    task: Literal["segmentation", "classification"]
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    ignore_index: int = IGNORE_INDEX
    class_names: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # provenance the source records on every run

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
