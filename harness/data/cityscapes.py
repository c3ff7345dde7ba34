"""Cityscapes (fine annotations) through torchvision's ``Cityscapes`` (never downloads or unzips).

Layout::

    ROOT/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

torchvision returns the raw labelIds (0..33, -1 for the licence plate); they are mapped to the 19 train ids
with a lookup table built from ``Cityscapes.classes[i].train_id``; labels whose train id is 255 or -1 (void,
ego vehicle, ...) become 255, the ignore index. E.g. labelId 7 (road) -> 0, labelId 26 (car) -> 13,
labelId 0 (unlabeled) -> 255.

Splits (``split``), always by whole cities, since neighbouring frames of one drive are near-identical and
must not land in two splits. The official ``test`` split has no public labels and is not used.

* ``val_halves`` (default): train = Cityscapes ``train`` (2,975 images of 18 cities). Cityscapes ``val``
  (500 images of 3 cities) is split by city: cities are taken largest first, each into the half that holds
  fewer images so far (val on a tie). The official val set gives val = frankfurt (267 images), test =
  munster + lindau (174 + 59 = 233).
* ``train_holdout``: val = ``holdout_cities`` of official train, or when unset about ``holdout_fraction``
  of its images in whole cities (smallest cities first, each taken while it brings the count closer:
  at 0.15, darmstadt, monchengladbach, ulm, bochum and krefeld, 85 + 94 + 95 + 96 + 99 = 469 images);
  train = the other cities (2,506 images); test = the whole official val set (500), as papers report.

Images are resized to 256x512 (height x width) by default (``augment.resize``); masks with nearest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from harness.data._splits import OfficialValSplitConfig, holdout_groups
from harness.data.base import DATA, IGNORE_INDEX, DataSplits
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


class CityscapesConfig(OfficialValSplitConfig):
    source: Literal["cityscapes"] = "cityscapes"
    root: str
    augment: CityscapesAugmentConfig = Field(default_factory=CityscapesAugmentConfig)
    holdout_cities: list[str] | None = Field(
        None, description="train_holdout: the train cities held out as val (unset: by holdout_fraction)"
    )

    @model_validator(mode="after")
    def _cities_need_holdout(self):
        if self.holdout_cities is not None and self.split != "train_holdout":
            raise ValueError("holdout_cities needs split: train_holdout; set it or remove holdout_cities")
        if self.holdout_cities is not None and not self.holdout_cities:
            raise ValueError("holdout_cities is empty; name at least one train city or remove it")
        return self


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


def train_holdout(root: Path, images: list[str], cfg: CityscapesConfig) -> tuple[list[int], list[int]]:
    """Indices of the official train ``images`` kept for training and held out as val, by whole cities."""
    cities = [Path(path).parent.name for path in images]
    if cfg.holdout_cities is None:
        kept, held = holdout_groups(cities, cfg.holdout_fraction)
    else:
        unknown = sorted(set(cfg.holdout_cities) - set(cities))
        if unknown:
            raise DataError(
                f"{root / 'leftImg8bit' / 'train'}: data.holdout_cities names {', '.join(unknown)}, not a train "
                f"city here; use some of {', '.join(sorted(set(cities)))}"
            )
        held = [i for i, c in enumerate(cities) if c in cfg.holdout_cities]
        kept = [i for i, c in enumerate(cities) if c not in cfg.holdout_cities]
    if not kept or not held:
        raise DataError(
            f"{root / 'leftImg8bit' / 'train'}: {len(set(cities))} train city(ies); split train_holdout needs "
            "one held out and one left to train on; add cities or change data.holdout_cities"
        )
    return kept, held


@DATA.register(CityscapesConfig)
def load_cityscapes(cfg: CityscapesConfig) -> DataSplits:
    root = Path(cfg.root).expanduser()
    check_cityscapes_layout(root)
    train_set = _cityscapes(root, "train")
    val_set = _cityscapes(root, "val")
    if cfg.split == "train_holdout":
        train_idx, val_idx = train_holdout(root, train_set.images, cfg)
        val_base, test_idx = train_set, list(range(len(val_set)))
    else:
        train_idx, val_base = list(range(len(train_set))), val_set
        val_idx, test_idx = city_halves(val_set.images)
        if not test_idx:
            raise DataError(
                f"{root / 'leftImg8bit' / 'val'}: 1 city; our val and test splits take whole cities of it, so "
                f"it needs at least 2; {FIX}"
            )
    lut = train_id_lookup()
    train_tf = build_transform(cfg.augment, True, 3, IGNORE_INDEX)
    eval_tf = build_transform(cfg.augment, False, 3, IGNORE_INDEX)
    return DataSplits(
        task="segmentation",
        train=PairView(train_set, train_idx, train_tf, deterministic=not cfg.augment.random, label_map=lut),
        val=PairView(val_base, val_idx, eval_tf, deterministic=True, label_map=lut),
        test=PairView(val_set, test_idx, eval_tf, deterministic=True, label_map=lut),
        num_classes=19,
        in_channels=3,
        ignore_index=IGNORE_INDEX,
        class_names=train_class_names(),
    )
