"""Shared split pieces: the classification sources' seeded stratified splits and tensor conversion, and
the segmentation sources' ``split: train_holdout`` mode (VOC, Cityscapes).

Every classification split here is stratified (each class is divided in the same proportions) and a pure
function of the labels and the seed, so the same config always gives the same train/val/test indices. The
hold-out splits take no seed: they are a pure function of the file lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_serializer

from harness.data.base import DataConfigBase, DataSplits, Normalization, TensorSplit


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Disjoint index arrays, one per fraction (fractions sum to 1), each holding that share of every class.

    Within a class the boundaries are rounded cumulative shares, so the parts cover the class exactly and
    no index is lost or repeated. Each part comes back in a seeded random order.
    """
    labels = np.asarray(labels)
    fracs = np.asarray(fractions, dtype=np.float64)
    if fracs.ndim != 1 or len(fracs) == 0 or (fracs < 0).any() or not np.isclose(fracs.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fracs]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum(np.concatenate([[0.0], fracs])) * len(members)).astype(int)
        bounds[-1] = len(members)
        for i in range(len(fracs)):
            parts[i].append(members[bounds[i] : bounds[i + 1]])
    return [rng.permutation(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions (into ``labels``) of a seeded stratified sample of about ``n`` items (all if n >= len)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    frac = n / len(labels)
    return stratified_split(labels, [frac, 1.0 - frac], seed)[0]


class OfficialValSplitConfig(DataConfigBase):
    """How a segmentation source with official train and val sets (VOC, Cityscapes) makes its three splits.

    ``val_halves`` (default): train = official train; val and test = two halves of official val.
    ``train_holdout``: part of official train is held out as val (model selection) and test is the *whole*
    official val set, so test figures can be set beside published single-scale val numbers.
    """

    split: Literal["val_halves", "train_holdout"] = Field(
        "val_halves",
        description="val_halves: val/test = halves of official val; train_holdout: val = part of official "
        "train, test = all of official val (the papers' numbers)",
    )
    holdout_fraction: float = Field(
        0.15, gt=0, lt=1, description="train_holdout: share of official train held out as val"
    )

    @model_serializer(mode="wrap")
    def _drop_defaults(self, handler):
        # The default split mode (and unset normalize) are left out of dumps: earlier configs keep their hash.
        data = handler(self)
        if isinstance(data, dict):
            if data.get("normalize") is None:
                data.pop("normalize", None)
            if data.get("split") == "val_halves":
                for key in ("split", "holdout_fraction", "holdout_cities"):
                    data.pop(key, None)
        return data


def spread_holdout(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """Positions 0..n-1 split into (kept, held out): about ``fraction`` of them held out, evenly spread over
    the list (position i is held out when floor((i + 1) * f) > floor(i * f)); at least one of each."""
    held = [i for i in range(n) if int((i + 1) * fraction) > int(i * fraction)]
    if not held and n >= 2:
        held = [n - 1]
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def holdout_groups(groups: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Positions of ``groups`` (one group name per item, e.g. its city) split into (kept, held out) by whole
    groups: smallest groups first (then by name), each held out while that brings the held-out count closer
    to ``fraction`` of all items; at least one group held out and one kept."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    target = fraction * len(groups)
    chosen: set[str] = set()
    count = 0
    for g in sorted(sizes, key=lambda g: (sizes[g], g))[:-1]:  # the largest group always stays for training
        if chosen and abs(count + sizes[g] - target) >= abs(count - target):
            break
        chosen.add(g)
        count += sizes[g]
    held = [i for i, g in enumerate(groups) if g in chosen]
    return [i for i, g in enumerate(groups) if g not in chosen], held


def to_images(array: np.ndarray | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(np.asarray(array))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif channels_last:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().float().div_(255.0)


def standardise(splits: list[TensorSplit]) -> None:
    """Scale every split in place with the per-channel mean and std of the first (training) split."""
    train = splits[0].images
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    for s in splits:
        s.images.sub_(mean).div_(std)


class TorchvisionClassificationConfig(DataConfigBase):
    """Fields shared by the sources read from local torchvision-layout folders (nothing is downloaded)."""

    root: str = Field("data", description="folder holding the dataset (relative to the working directory)")
    val_fraction: float = Field(
        1 / 6, gt=0, lt=1, description="share of the official train set held out for validation"
    )
    limit_train: int | None = Field(
        None, ge=10, description="keep a stratified sample of this many training images"
    )
    normalize: bool | Normalization = Field(
        False,
        description="true: standardise each channel with the training split's mean and std; "
        "or {mean: [...], std: [...]}",
    )
    seed: int = 0


def build_classification_splits(
    cfg: TorchvisionClassificationConfig,
    train_images: torch.Tensor,
    train_targets: torch.Tensor,
    test_images: torch.Tensor,
    test_targets: torch.Tensor,
    class_names: list[str],
) -> DataSplits:
    """Split the official train set into train/val (seeded, stratified), optionally subsample train."""
    labels = train_targets.numpy()
    train_idx, val_idx = stratified_split(labels, [1.0 - cfg.val_fraction, cfg.val_fraction], cfg.seed)
    if cfg.limit_train is not None:
        train_idx = train_idx[stratified_subset(labels[train_idx], cfg.limit_train, cfg.seed + 1)]
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    splits = [
        TensorSplit(train_images[tr], train_targets[tr]),
        TensorSplit(train_images[va], train_targets[va]),
        TensorSplit(test_images, test_targets),
    ]
    return classification_splits(splits, class_names, cfg.normalize)


def classification_splits(
    splits: list[TensorSplit], class_names: list[str], normalize: bool | Normalization
) -> DataSplits:
    """Train, val and test tensors as a classification DataSplits, optionally standardised by train stats
    (``normalize`` true; given statistics are applied by ``load_data``)."""
    if normalize is True:
        standardise(splits)
    return DataSplits(
        task="classification",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=len(class_names),
        in_channels=splits[0].images.shape[1],
        class_names=list(class_names),
    )


IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_LAYOUT = "{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed)"


def what_is_missing(folder: Path, missing: list[str], total: int) -> str:
    if not folder.is_dir():
        return f"no folder {folder.resolve()}"
    if len(missing) == total:
        return f"{folder.resolve()} holds none of the files"
    return f"{folder.resolve()} lacks {', '.join(missing)}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_idx_dataset(dataset_cls, cfg: TorchvisionClassificationConfig, fix: str) -> DataSplits:
    """Load an MNIST-family torchvision dataset (MNIST, FashionMNIST) from ROOT/<ClassName>/raw/ without
    downloading; anything missing or unreadable becomes one DataError line naming the path, layout and fix."""
    from harness.errors import DataError

    name = dataset_cls.__name__
    root = Path(cfg.root).expanduser()
    raw = root / name / "raw"
    missing = [f for f in IDX_FILES if not (raw / f).is_file()]
    if missing:
        gz = [f for f in missing if (raw / f"{f}.gz").is_file()]
        hint = f" ({len(gz)} of them only as .gz: gunzip them)" if gz else ""
        raise DataError(
            f"{name} not found: {what_is_missing(raw, missing, len(IDX_FILES))}{hint}; expected layout "
            f"ROOT/{name}/raw/{IDX_LAYOUT} with ROOT = data.root = '{cfg.root}'; fix: {fix}"
        )
    try:
        train = dataset_cls(str(root), train=True, download=False)
        test = dataset_cls(str(root), train=False, download=False)
    except (RuntimeError, ValueError, AssertionError, OSError) as exc:
        raise DataError(
            f"{name} files in {raw.resolve()} could not be read ({first_line(exc)}); fix: {fix}"
        ) from exc
    return build_classification_splits(
        cfg,
        to_images(train.data),
        train.targets.long(),
        to_images(test.data),
        test.targets.long(),
        list(train.classes),
    )
