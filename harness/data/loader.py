"""Batches of (images, targets, sample indices) from any split.

A TensorSplit is sliced directly (no per-sample Python work, no worker processes); a split that makes its
views on the device (``pass_rows``/``views``: random augmentation of in-memory data, replayed teacher views)
draws one view per sample per pass and builds each batch in one call; any other Dataset goes through a
DataLoader. The indices let the trainer look up cached teacher outputs for each sample.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from harness.data.base import TensorSplit
from harness.errors import DataError


class _WithIndex(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, i


def iterate_batches(
    split: Dataset,
    batch_size: int,
    *,
    device: torch.device,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
):
    n = len(split)
    if hasattr(split, "pass_rows"):  # views made on the device per pass (device_augment.py, engine/views.py)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        rows = split.pass_rows(shuffle, generator)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x, y = split.views(idx, rows[idx])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx
        return
    if isinstance(split, TensorSplit):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(split.images.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x, y = split.images[idx], split.targets[idx]
            if x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y, idx
        return
    workers = min(4, os.cpu_count() or 1)
    loader = DataLoader(
        _WithIndex(split),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    try:
        for x, y, idx in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx
    except DataError as exc:  # raised in a worker: torch wraps our one-line message in the worker's traceback
        raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def fixed_inputs(split: Dataset) -> bool:
    """True when a sample's input is the same every epoch (no random augmentation): teacher outputs can be cached."""
    return isinstance(split, TensorSplit) or getattr(split, "deterministic", False)
