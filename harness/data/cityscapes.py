"""Cityscapes (fine annotations) through torchvision's ``Cityscapes`` (never downloads or unzips).

Layout::

    ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

torchvision returns the raw labelIds (0..33, -1 for the licence plate); they are mapped to the 19 train ids
with a lookup table built from ``Cityscapes.classes[i].train_id``; labels whose train id is 255 or -1 (void,
ego vehicle, ...) become 255, the ignore index. E.g. labelId 7 (road) -> 0, labelId 26 (car) -> 13,
labelId 0 (unlabeled) -> 255.

Splits: train = Cityscapes ``train`` (2,975 images). Cityscapes ``val`` (500 images of 3 cities) is split
by city, since neighbouring frames of one drive are near-identical and must not land in both: cities are
taken largest first, each into the half that holds fewer images so far (val on a tie). The official val
set gives val = frankfurt (267 images), test = munster + lindau (174 + 59 = 233). The official ``test``
split has no public labels and is not used.

Images are resized to 256x512 (height x width) by default (``augment.resize``); masks with nearest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from harness.data.base import DATA, IGNORE_INDEX, DataConfigBase, DataSplits
from harness.data.transforms import AugmentConfig, PairView, build_transform
from harness.errors import DataError

LAYOUT = (
    "expected ROOT/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
    "ROOT/gtFine/{train,val}/<city>/*_gtFine_labelIds.png"
)
FIX = (
    "set data.root to the folder holding leftImg8bit and gtFine "
    "(unzip leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip there)"
)


class CityscapesAugmentConfig(AugmentConfig):
    resize: int | tuple[int, int] | None = (256, 512)


class CityscapesConfig(DataConfigBase):
    source: Literal["cityscapes"] = "cityscapes"
    root: str
    augment: CityscapesAugmentConfig = Field(default_factory=CityscapesAugmentConfig)


def train_id_lookup() -> torch.Tensor:
    """256-entry table: raw labelId -> train id (0..18), everything else -> 255."""
    from torchvision.datasets import Cityscapes

    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    for cls in Cityscapes.classes:
        if 0 <= cls.id < 256 and cls.train_id not in (255, -1):
            lut[cls.id] = cls.train_id
    return lut


def train_class_names() -> list[str]:
    from torchvision.datasets import Cityscapes

    names = {c.train_id: c.name for c in Cityscapes.classes if c.train_id not in (255, -1)}
    return [names[i] for i in range(19)]


def check_cityscapes_layout(root: Path, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Raise a one-line DataError unless every split has image and labelId files, city by city."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; {LAYOUT}; {FIX}")
    for split in splits:
        images_dir = root / "leftImg8bit" / split
        targets_dir = root / "gtFine" / split
        for folder in (images_dir, targets_dir):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder not found; {LAYOUT}; {FIX}")
        cities = sorted(p for p in images_dir.iterdir() if p.is_dir())
        stray = [p.name for p in images_dir.iterdir() if not p.is_dir()]
        if stray:
            raise DataError(
                f"{images_dir}: holds files ({', '.join(stray[:3])}) beside the city folders; {LAYOUT}; "
                "move them out"
            )
        if not cities:
            raise DataError(f"{images_dir}: no city folders; {LAYOUT}; {FIX}")
        for city in cities:
            images = sorted(city.glob("*_leftImg8bit.png"))
            if not images:
                raise DataError(f"{city}: no *_leftImg8bit.png images; {LAYOUT}; {FIX}")
            for image in images:
                stem = image.name.split("_leftImg8bit")[0]
                target = targets_dir / city.name / f"{stem}_gtFine_labelIds.png"
                if not target.is_file():
                    raise DataError(f"{target}: label file for {image.name} not found; {LAYOUT}; {FIX}")


def _cityscapes(root: Path, split: str):
    from torchvision.datasets import Cityscapes

    ds = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
    # torchvision lists files in os.listdir order, which varies between file systems: sort for stable splits.
    order = sorted(range(len(ds.images)), key=lambda i: ds.images[i])
    ds.images = [ds.images[i] for i in order]
    ds.targets = [ds.targets[i] for i in order]
    return ds


def city_halves(images: list[str]) -> tuple[list[int], list[int]]:
    """Indices of ``images`` (paths ``.../<city>/<file>``) in two halves of whole cities, about equal in size:
    cities largest first (then by name), each into the half with fewer images so far, the first on a tie."""
    by_city: dict[str, list[int]] = {}
    for i, path in enumerate(images):
        by_city.setdefault(Path(path).parent.name, []).append(i)
    halves: tuple[list[int], list[int]] = ([], [])
    for city in sorted(by_city, key=lambda c: (-len(by_city[c]), c)):
        halves[0 if len(halves[0]) <= len(halves[1]) else 1].extend(by_city[city])
    return sorted(halves[0]), sorted(halves[1])


@DATA.register(CityscapesConfig)
def load_cityscapes(cfg: CityscapesConfig) -> DataSplits:
    root = Path(cfg.root).expanduser()
    check_cityscapes_layout(root)
    train_set = _cityscapes(root, "train")
    val_set = _cityscapes(root, "val")
    val_idx, test_idx = city_halves(val_set.images)
    if not test_idx:
        raise DataError(
            f"{root / 'leftImg8bit' / 'val'}: 1 city; our val and test splits take whole cities of it, so it "
            f"needs at least 2; {FIX}"
        )
    lut = train_id_lookup()
    train_tf = build_transform(cfg.augment, True, 3, IGNORE_INDEX)
    eval_tf = build_transform(cfg.augment, False, 3, IGNORE_INDEX)
    return DataSplits(
        task="segmentation",
        train=PairView(
            train_set, range(len(train_set)), train_tf, deterministic=not cfg.augment.random, label_map=lut
        ),
        val=PairView(val_set, val_idx, eval_tf, deterministic=True, label_map=lut),
        test=PairView(val_set, test_idx, eval_tf, deterministic=True, label_map=lut),
        num_classes=19,
        in_channels=3,
        ignore_index=IGNORE_INDEX,
        class_names=train_class_names(),
    )
