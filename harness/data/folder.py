"""Your own data: a folder of images and a folder of class-index masks with the same file stems.

Layout::

    ROOT/images/<stem>.png|jpg|jpeg|tif|tiff    RGB or grayscale, 8 or 16 bits (converted to ``in_channels``)
    ROOT/masks/<stem>.png|tif|tiff|...          single channel, pixel value = class index (or ignore_index)

Images are scaled to [0, 1] as ``intensity`` says (``harness.data.intensity``): by their integer type's
range (default; 8-bit files as before, 16-bit PNG and TIFF by 65535 rather than clipped at 255) or per image
by percentiles.

Splits come either from three list files (``train_list``, ``val_list``, ``test_list``: one stem per line,
paths relative to ROOT; blank lines and ``#`` comments are skipped; a stem in two lists is an error, as it
would leak into evaluation) or, when no list is given, from a seeded shuffle of all stems cut by
``val_fraction`` and ``test_fraction``. Binary masks saved as 0/255 are
read with ``binary_255: true`` (255 -> class 1, so ``num_classes`` must be 2). A mask value outside
``[0, num_classes)`` other than ``ignore_index`` raises a DataError naming the file when that sample loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_serializer, model_validator
from torch.utils.data import Dataset

from harness.data.base import DATA, IGNORE_INDEX, DataConfigBase, DataSplits
from harness.data.intensity import IntensityConfig, image_size, read_image, read_mask
from harness.data.transforms import AugmentConfig, PairView, build_transform
from harness.errors import ConfigError, DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class FolderConfig(DataConfigBase):
    source: Literal["folder"] = "folder"
    root: str
    images: str = Field("images", description="image folder, relative to root")
    masks: str = Field("masks", description="mask folder, relative to root")
    num_classes: int = Field(ge=2)
    ignore_index: int = IGNORE_INDEX
    binary_255: bool = Field(False, description="masks stored as 0/255: read 255 as class 1")
    in_channels: Literal[1, 3] = 3
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    class_names: list[str] | None = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    intensity: IntensityConfig = Field(
        default_factory=IntensityConfig, description="how images deeper than 8 bits are scaled to [0, 1]"
    )

    @model_serializer(mode="wrap")
    def _drop_defaults(self, handler):
        # A default intensity is left out of dumps, so folder configs (and teacher hashes) read as before it.
        data = DataConfigBase._drop_unset_normalize(self, handler)
        if isinstance(data, dict) and self.intensity == IntensityConfig():
            data.pop("intensity", None)
        return data

    @model_validator(mode="after")
    def _check(self):
        lists = [self.train_list, self.val_list, self.test_list]
        if any(x is not None for x in lists) and not all(x is not None for x in lists):
            raise ValueError(
                "give all three of train_list, val_list, test_list, "
                "or none (then val_fraction/test_fraction split)"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 to leave images for training")
        if self.binary_255 and self.num_classes != 2:
            raise ValueError("binary_255 reads 0/255 masks as classes 0/1, so num_classes must be 2")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index {self.ignore_index} is a class id; use a value >= num_classes (usually 255)"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        return self


LAYOUT = (
    "expected ROOT/{images}/<stem>.png|jpg|tif and ROOT/{masks}/<stem>.png|tif "
    "(class-index masks, same stems)"
)


def _index(folder: Path, what: str, cfg: FolderConfig) -> dict[str, Path]:
    layout = LAYOUT.format(images=cfg.images, masks=cfg.masks)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: {what} folder not found; {layout}; set data.root (and data.{what}) to where they are"
        )
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in EXTENSIONS or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(
                f"{path}: two {what} files share the stem '{path.stem}' ({files[path.stem].name}); keep one"
            )
        files[path.stem] = path
    if not files:
        raise DataError(f"{folder}: no {'/'.join(EXTENSIONS)} files in the {what} folder; {layout}")
    return files


def _read_list(root: Path, name: str, key: str) -> list[str]:
    path = root / name
    if not path.is_file():
        raise DataError(
            f"{path}: {key} file not found; it lists one image stem per line, relative to data.root; "
            f"fix data.{key}"
        )
    stems = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            stem = Path(line).name
            stems.append(Path(stem).stem if Path(stem).suffix.lower() in EXTENSIONS else stem)
    if not stems:
        raise DataError(f"{path}: {key} lists no images; add one stem per line")
    return stems


class FolderPairs(Dataset):
    """(image tensor C,H,W, mask array) for each (image path, mask path),
    with the mask checked against the label space."""

    def __init__(self, pairs: list[tuple[Path, Path]], cfg: FolderConfig):
        self.pairs = pairs
        self.channels = cfg.in_channels
        self.intensity = cfg.intensity
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index
        self.binary_255 = cfg.binary_255

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image_path, mask_path = self.pairs[i]
        image = read_image(image_path, self.channels, self.intensity)
        mask = read_mask(mask_path)
        if mask.ndim != 2:
            raise DataError(
                f"{mask_path}: mask has {mask.shape[-1]} channels; masks must be single-channel class-index "
                "images (save as 8-bit grayscale or palette PNG)"
            )
        height, width = image.shape[-2:]
        if mask.shape != (height, width):
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                f"{width}x{height}; masks must match their images pixel for pixel"
            )
        mask = mask.astype(np.int64)
        if self.binary_255:
            mask[mask == 255] = 1
        bad = (mask < 0) | ((mask >= self.num_classes) & (mask != self.ignore_index))
        if bad.any():
            values = sorted(int(v) for v in np.unique(mask[bad]))[:8]
            hint = " (0/255 binary masks? set binary_255: true)" if values == [255] else ""
            raise DataError(
                f"{mask_path}: mask values {values} are outside [0, {self.num_classes}) and not ignore_index "
                f"{self.ignore_index}; fix the mask or data.num_classes/ignore_index{hint}"
            )
        return image, mask


def _check_sizes(pairs: list[tuple[Path, Path]]) -> None:
    first = None
    for image_path, _ in pairs:
        height, width = image_size(image_path)
        if first is None:
            first = (image_path, (width, height))
        elif (width, height) != first[1]:
            raise DataError(
                f"{image_path}: image is {width}x{height} but {first[0].name} is "
                f"{first[1][0]}x{first[1][1]}; batches need one size: set data.augment.resize or "
                "data.augment.crop"
            )


def _check_disjoint(root: Path, cfg: FolderConfig, split_stems: list[list[str]]) -> None:
    """A stem in two split lists would be trained on and evaluated on: refuse it."""
    keys = ("train_list", "val_list", "test_list")
    for a in range(3):
        for b in range(a + 1, 3):
            shared = sorted(set(split_stems[a]) & set(split_stems[b]))
            if shared:
                raise ConfigError(
                    f"{root / getattr(cfg, keys[a])} and {root / getattr(cfg, keys[b])}: data.{keys[a]} and "
                    f"data.{keys[b]} share {len(shared)} stem(s) (e.g. {', '.join(shared[:3])}), which would "
                    "leak into evaluation; list each stem in one split only"
                )


@DATA.register(FolderConfig)
def load_folder(cfg: FolderConfig) -> DataSplits:
    root = Path(cfg.root).expanduser()
    layout = LAYOUT.format(images=cfg.images, masks=cfg.masks)
    if not root.is_dir():
        raise DataError(f"{root}: data.root not found; {layout}; set data.root to the folder that holds them")
    images = _index(root / cfg.images, "images", cfg)
    masks = _index(root / cfg.masks, "masks", cfg)
    unmatched = [s for s in images if s not in masks]
    if unmatched:
        raise DataError(
            f"{root / cfg.images}: {len(unmatched)} images have no mask in {root / cfg.masks} "
            f"(e.g. {', '.join(unmatched[:3])}); add masks with the same stems or remove those images"
        )

    if cfg.train_list is not None:
        split_stems = []
        for key in ("train_list", "val_list", "test_list"):
            stems = _read_list(root, getattr(cfg, key), key)
            missing = [s for s in stems if s not in images]
            if missing:
                raise DataError(
                    f"{root / getattr(cfg, key)}: lists {len(missing)} stems with no image in "
                    f"{root / cfg.images} (e.g. {', '.join(missing[:3])}); fix the list or add the images"
                )
            split_stems.append(stems)
        _check_disjoint(root, cfg, split_stems)
    else:
        stems = sorted(images)
        n = len(stems)
        n_val = max(1, round(n * cfg.val_fraction))
        n_test = max(1, round(n * cfg.test_fraction))
        if n - n_val - n_test < 1:
            raise DataError(
                f"{root / cfg.images}: {n} images cannot fill train, val and test; "
                "add images or give list files"
            )
        order = np.random.default_rng(cfg.seed).permutation(n)
        shuffled = [stems[i] for i in order]
        split_stems = [shuffled[n_val + n_test :], shuffled[:n_val], shuffled[n_val : n_val + n_test]]

    all_stems = [s for group in split_stems for s in group]
    pairs = [(images[s], masks[s]) for s in all_stems]
    if not cfg.augment.fixed_size:
        _check_sizes(pairs)
    base = FolderPairs(pairs, cfg)
    bounds = np.cumsum([0] + [len(g) for g in split_stems])
    views = []
    for k, train in enumerate((True, False, False)):
        transform = build_transform(cfg.augment, train, cfg.in_channels, cfg.ignore_index)
        views.append(
            PairView(
                base,
                range(bounds[k], bounds[k + 1]),
                transform,
                deterministic=not (train and cfg.augment.random),
            )
        )
    return DataSplits(
        task="segmentation",
        train=views[0],
        val=views[1],
        test=views[2],
        num_classes=cfg.num_classes,
        in_channels=cfg.in_channels,
        ignore_index=cfg.ignore_index,
        class_names=list(cfg.class_names)
        if cfg.class_names
        else [f"class {i}" for i in range(cfg.num_classes)],
    )
