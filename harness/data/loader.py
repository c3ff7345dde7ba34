"""Batches of (images, targets, sample indices) from any split.

A TensorSplit is sliced directly (no per-sample Python work, no worker processes); a split that makes its
views on the device (``pass_rows``/``views``: random augmentation of in-memory data, replayed teacher views)
draws one view per sample per pass and builds each batch in one call; any other Dataset goes through a
DataLoader (replayed views of files: ``new_pass`` picks the pass's views first, the workers return each
sample's view id and it is checked). The indices let the trainer look up cached teacher outputs for each sample.
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
        if hasattr(self.base, "sample"):  # replayed views of files: (x, y, i, view id), engine/file_views.py
            return self.base.sample(i)
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
    shard: tuple[int, int] = (0, 1),
):
    """Batches of ``batch_size`` in a seeded order. With ``shard=(rank, world)`` each batch of that order is
    split over ``world`` processes and this one gets ``batch[rank::world]`` (DistributedSampler's split;
    empty shares skipped): together the processes see the one-process batches, in the same order."""
    n = len(split)
    if hasattr(split, "pass_rows"):  # views made on the device per pass (device_augment.py, engine/views.py)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        rows = split.pass_rows(shuffle, generator)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for idx in _shares(order, batch_size, stop, shard):
            x, y = split.views(idx, rows[idx])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx
        return
    if isinstance(split, TensorSplit):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(split.images.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for idx in _shares(order, batch_size, stop, shard):
            x, y = split.images[idx], split.targets[idx]
            if x.device != device:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y, idx
        return
    if hasattr(split, "new_pass"):  # replayed views of files: this pass's choice, before the workers start
        split.new_pass(shuffle)
    workers = min(4, os.cpu_count() or 1)
    batching = dict(batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)
    if shard[1] > 1:
        batching = _shard_batching(n, batch_size, shuffle, generator, drop_last, shard)
    loader = DataLoader(
        _WithIndex(split),
        **batching,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    try:
        for x, y, idx, *view in loader:
            if view:
                split.check_views(idx, view[0])
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), idx
    except DataError as exc:  # raised in a worker: torch wraps our one-line message in the worker's traceback
        raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def _shares(order: torch.Tensor, batch_size: int, stop: int, shard: tuple[int, int]):
    rank, world = shard
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size][rank::world]
        if len(idx):
            yield idx


def _shard_batching(n, batch_size, shuffle, generator, drop_last, shard) -> dict:
    """DataLoader arguments for this rank's shares of the batches one process draws: the same draws from
    the same generator (the loader's base seed, the permutation, and the one more permutation torch's
    RandomSampler draws at its end). The workers' random augmentations are seeded apart per rank."""
    seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator)) if generator else 0
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shuffle:
        torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    shares = [idx.tolist() for idx in _shares(order, batch_size, stop, shard)]
    return {"batch_sampler": shares, "generator": torch.Generator().manual_seed(seed + shard[0])}


def fixed_inputs(split: Dataset) -> bool:
    """True when a sample's input is the same every epoch (no random augmentation): teacher outputs can be cached."""
    return isinstance(split, TensorSplit) or getattr(split, "deterministic", False)
