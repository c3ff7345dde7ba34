"""CIFAR-10 (50,000 + 10,000 colour images, 32x32, 10 classes) from a local folder.

Read with torchvision's ``CIFAR10(root, download=False)``, which wants the python version of the set
unpacked as ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and checks the md5 of
every batch file. Nothing is downloaded here: a missing or corrupted folder is one DataError line. The
official train set is split into train/val (seeded, stratified); the official test set is the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from harness.data._splits import (
    TorchvisionClassificationConfig,
    build_classification_splits,
    first_line,
    to_images,
    what_is_missing,
)
from harness.data.base import DATA, DataSplits
from harness.errors import DataError

FOLDER = "cifar-10-batches-py"
FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)
FIX = (
    "CIFAR-10 cannot be downloaded here: unpack cifar-10-python.tar.gz (the python version, "
    "https://www.cs.toronto.edu/~kriz/cifar.html) copied from another machine into ROOT"
)


class CIFAR10Config(TorchvisionClassificationConfig):
    source: Literal["cifar10"] = "cifar10"
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the official train set held out for validation"
    )


@DATA.register(CIFAR10Config)
def load_cifar10(cfg: CIFAR10Config) -> DataSplits:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser()
    folder = root / FOLDER
    layout = f"expected layout ROOT/{FOLDER}/{{data_batch_1..5,test_batch,batches.meta}} with ROOT = data.root = '{cfg.root}'"
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 not found: {what_is_missing(folder, missing, len(FILES))}; {layout}; fix: {FIX}"
        )
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise DataError(
            f"CIFAR-10 in {folder.resolve()} failed torchvision's md5 check or could not be read "
            f"({first_line(exc)}); {layout}, files exactly as in cifar-10-python.tar.gz; fix: {FIX}"
        ) from exc
    return build_classification_splits(
        cfg,
        to_images(train.data, channels_last=True),
        torch.as_tensor(train.targets, dtype=torch.long),
        to_images(test.data, channels_last=True),
        torch.as_tensor(test.targets, dtype=torch.long),
        list(train.classes),
    )
