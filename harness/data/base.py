"""What every data source returns: three splits, the task, and the label space."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
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


class DataConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


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

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
