"""PASCAL VOC 2012 segmentation through torchvision's ``VOCSegmentation`` (never downloads).

Layout: ``ROOT/VOCdevkit/VOC2012/{ImageSets/Segmentation/{train,val}.txt, JPEGImages, SegmentationClass}``.
21 classes (background + 20), 255 marks object boundaries and is ignored.

Splits (``split``): ``val_halves`` (default): train = VOC's ``train`` set (1,464 images). VOC's ``val`` set
(1,449) is split in half deterministically and interleaved: the images at even positions of ``val.txt`` form
our val split, those at odd positions our test split (so both halves span the whole list, which is ordered
by year). VOC's images are single photographs, not frames of sequences, so neighbours in the list are not
near-copies of each other (Cityscapes' are, and is split by city instead).
``train_holdout``: val = ``holdout_fraction`` of ``train.txt`` (15%: 219 images), evenly spread over the
list; train = the rest (1,245); test = the whole of ``val.txt`` (1,449), the set papers report on (they
train on the 10,582-image SBD-augmented set, which this source does not read).

Images are resized to 256x256 by default (``augment.resize``) so batches stack; masks with nearest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from harness.data._splits import OfficialValSplitConfig, spread_holdout
from harness.data.base import DATA, IGNORE_INDEX, DataSplits
from harness.data.transforms import AugmentConfig, PairView, alternate_halves, build_transform
from harness.errors import DataError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
LAYOUT = (
    "expected ROOT/VOCdevkit/VOC2012/{ImageSets/Segmentation/{train,val}.txt,JPEGImages,SegmentationClass}"
)
FIX = "set data.root to the folder that holds VOCdevkit (unpack VOCtrainval_11-May-2012.tar there)"


class VOCAugmentConfig(AugmentConfig):
    resize: int | tuple[int, int] | None = 256


class VOCConfig(OfficialValSplitConfig):
    source: Literal["voc"] = "voc"
    root: str
    augment: VOCAugmentConfig = Field(default_factory=VOCAugmentConfig)


def check_voc_layout(root: Path, image_sets: tuple[str, ...] = ("train", "val")) -> None:
    """Raise a one-line DataError unless ROOT holds the VOC 2012 segmentation files torchvision reads."""
    voc = root / "VOCdevkit" / "VOC2012"
    needed = [root, voc, voc / "ImageSets" / "Segmentation", voc / "JPEGImages", voc / "SegmentationClass"]
    for path in needed:
        if not path.is_dir():
            raise DataError(f"{path}: folder not found; {LAYOUT}; {FIX}")
    for name in image_sets:
        split_file = voc / "ImageSets" / "Segmentation" / f"{name}.txt"
        if not split_file.is_file():
            raise DataError(f"{split_file}: split file not found; {LAYOUT}; {FIX}")
        stems = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
        if not stems:
            raise DataError(f"{split_file}: lists no images; {LAYOUT}; {FIX}")
        for stem in stems:
            for path in (voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png"):
                if not path.is_file():
                    raise DataError(f"{path}: listed in {split_file.name} but missing; {LAYOUT}; {FIX}")


@DATA.register(VOCConfig)
def load_voc(cfg: VOCConfig) -> DataSplits:
    from torchvision.datasets import VOCSegmentation

    root = Path(cfg.root).expanduser()
    check_voc_layout(root)
    train_set = VOCSegmentation(str(root), year="2012", image_set="train", download=False)
    val_set = VOCSegmentation(str(root), year="2012", image_set="val", download=False)
    train_tf = build_transform(cfg.augment, True, 3, IGNORE_INDEX)
    eval_tf = build_transform(cfg.augment, False, 3, IGNORE_INDEX)
    if cfg.split == "train_holdout":
        train_idx, val_idx = spread_holdout(len(train_set), cfg.holdout_fraction)
        if not train_idx or not val_idx:
            raise DataError(
                f"{root}: VOC train.txt lists {len(train_set)} image; split train_holdout needs at least 2; {FIX}"
            )
        val = PairView(train_set, val_idx, eval_tf, deterministic=True)
        test = PairView(val_set, range(len(val_set)), eval_tf, deterministic=True)
    else:
        train_idx = list(range(len(train_set)))
        val_idx, test_idx = alternate_halves(len(val_set))
        if not test_idx:
            raise DataError(
                f"{root}: VOC val.txt lists {len(val_set)} image; val and test need at least 2; {FIX}"
            )
        val = PairView(val_set, val_idx, eval_tf, deterministic=True)
        test = PairView(val_set, test_idx, eval_tf, deterministic=True)
    return DataSplits(
        task="segmentation",
        train=PairView(train_set, train_idx, train_tf, deterministic=not cfg.augment.random),
        val=val,
        test=test,
        num_classes=21,
        in_channels=3,
        ignore_index=IGNORE_INDEX,
        class_names=list(VOC_CLASSES),
    )
