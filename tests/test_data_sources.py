"""File-backed data sources (folder, voc, cityscapes) and their joint transforms, on tiny fake trees."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader

from harness.config import ExperimentConfig
from harness.data import DATA, load_data
from harness.data.cityscapes import train_class_names, train_id_lookup
from harness.data.transforms import AugmentConfig, build_transform
from harness.errors import ConfigError, DataError


def cfg(source: str, **kw):
    return DATA.config_class(source).model_validate({"source": source, **kw})


def save(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:  # a palette PNG like VOC's SegmentationClass: pixel values stay the class indices
        img.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
        assert img.mode == "P"
    img.save(path)


def pattern_mask(h: int, w: int, seed: int, values=(0, 1, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(values), size=(h, w))


def image_from_mask(mask: np.ndarray, step: int = 60) -> np.ndarray:
    """RGB image whose every channel is mask * step: lets a test check image and mask moved together."""
    plane = np.where(mask == 255, 250, mask * step)
    return np.stack([plane] * 3, axis=-1)


def make_folder(root: Path, n: int = 10, size=(12, 16), values=(0, 1, 2), mask_ext=".png", image_ext=".png"):
    masks = {}
    for i in range(n):
        stem = f"s{i:02d}"
        mask = pattern_mask(*size, seed=i, values=values)
        masks[stem] = mask
        save(root / "images" / f"{stem}{image_ext}", image_from_mask(np.where(mask == 255, 0, mask)))
        save(root / "masks" / f"{stem}{mask_ext}", mask)
    return masks


# ---------------------------------------------------------------- folder


def test_folder_fraction_split_returns_exact_pixels(tmp_path):
    masks = make_folder(tmp_path, n=10)
    splits = load_data(cfg("folder", root=str(tmp_path), num_classes=3, val_fraction=0.2, test_fraction=0.2))
    assert splits.sizes() == {"train": 6, "val": 2, "test": 2}
    assert (splits.task, splits.num_classes, splits.in_channels, splits.ignore_index) == (
        "segmentation",
        3,
        3,
        255,
    )
    stems = {
        name: [split.base.pairs[j][0].stem for j in split.indices]
        for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))
    }
    assert sorted(sum(stems.values(), [])) == sorted(masks)  # disjoint and complete
    x, y = splits.val[0]
    assert x.dtype == torch.float32 and x.shape == (3, 12, 16)
    assert y.dtype == torch.long and y.shape == (12, 16)
    expected = masks[stems["val"][0]]
    assert torch.equal(y, torch.from_numpy(expected).long())
    assert torch.allclose(x[1], torch.from_numpy(expected * 60 / 255.0).float())
    # the same seed gives the same split, another seed another
    again = load_data(cfg("folder", root=str(tmp_path), num_classes=3, val_fraction=0.2, test_fraction=0.2))
    assert (
        again.val.indices == splits.val.indices
        and [p[0].stem for p in again.val.base.pairs[6:8]] == stems["val"]
    )
    other = load_data(
        cfg("folder", root=str(tmp_path), num_classes=3, val_fraction=0.2, test_fraction=0.2, seed=3)
    )
    assert [other.val.base.pairs[j][0].stem for j in other.val.indices] != stems["val"]
    assert splits.val.deterministic and splits.train.deterministic  # no random augmentation configured


def test_folder_list_files_grayscale_and_mixed_extensions(tmp_path):
    make_folder(tmp_path, n=5, mask_ext=".tif", image_ext=".jpg")
    (tmp_path / "train.txt").write_text("# training stems\ns00\ns01.jpg\n\ns02\n")
    (tmp_path / "val.txt").write_text("s03\n")
    (tmp_path / "test.txt").write_text("s04\n")
    splits = load_data(
        cfg(
            "folder",
            root=str(tmp_path),
            num_classes=3,
            in_channels=1,
            train_list="train.txt",
            val_list="val.txt",
            test_list="test.txt",
        )
    )
    assert splits.sizes() == {"train": 3, "val": 1, "test": 1} and splits.in_channels == 1
    assert [splits.train.base.pairs[j][0].stem for j in splits.train.indices] == ["s00", "s01", "s02"]
    assert [splits.test.base.pairs[j][1].name for j in splits.test.indices] == ["s04.tif"]
    x, y = splits.test[0]
    assert x.shape == (1, 12, 16) and torch.equal(y, torch.from_numpy(pattern_mask(12, 16, seed=4)).long())


def test_folder_binary_255_masks(tmp_path):
    make_folder(tmp_path, n=4, values=(0, 255))
    with pytest.raises(ValidationError, match="num_classes must be 2"):
        cfg("folder", root=str(tmp_path), num_classes=3, binary_255=True)
    splits = load_data(
        cfg(
            "folder",
            root=str(tmp_path),
            num_classes=2,
            binary_255=True,
            val_fraction=0.25,
            test_fraction=0.25,
        )
    )
    _, y = splits.train[0]
    assert set(y.unique().tolist()) == {0, 1}
    # without the option 255 would be read as "ignore": allowed,
    # but a 0/255 set with ignore_index 7 is an error
    bad = load_data(
        cfg(
            "folder", root=str(tmp_path), num_classes=2, ignore_index=7, val_fraction=0.25, test_fraction=0.25
        )
    )
    with pytest.raises(DataError, match="binary_255: true") as err:
        bad.train[0]
    assert "masks/s0" in str(err.value) and "[255]" in str(err.value)


def test_folder_out_of_range_mask_value_names_the_file(tmp_path):
    make_folder(tmp_path, n=4)
    save(tmp_path / "masks" / "s02.png", np.full((12, 16), 7))
    splits = load_data(
        cfg(
            "folder",
            root=str(tmp_path),
            num_classes=3,
            train_list=None,
            val_fraction=0.25,
            test_fraction=0.25,
        )
    )
    errors = []
    for split in (splits.train, splits.val, splits.test):
        for i in range(len(split)):
            try:
                split[i]
            except DataError as exc:
                errors.append(str(exc))
    assert len(errors) == 1
    assert str(tmp_path / "masks" / "s02.png") in errors[0] and "[7]" in errors[0] and "[0, 3)" in errors[0]
    assert "\n" not in errors[0]


def test_folder_rgb_mask_and_size_mismatch_are_errors(tmp_path):
    make_folder(tmp_path, n=4)
    save(tmp_path / "masks" / "s01.png", np.zeros((12, 16, 3)))
    save(tmp_path / "masks" / "s03.png", np.zeros((6, 16)))
    splits = load_data(
        cfg("folder", root=str(tmp_path), num_classes=3, val_fraction=0.25, test_fraction=0.25)
    )
    base = splits.train.base
    by_stem = {p[0].stem: j for j, p in enumerate(base.pairs)}
    with pytest.raises(DataError, match="single-channel"):
        base[by_stem["s01"]]
    with pytest.raises(DataError, match="match their images"):
        base[by_stem["s03"]]


@pytest.mark.parametrize(
    "breakage, key, expected",
    [
        ("no_root", {}, "data.root not found"),
        ("no_masks", {}, "masks folder not found"),
        ("unmatched", {}, "have no mask"),
        (
            "missing_list",
            {"train_list": "tr.txt", "val_list": "va.txt", "test_list": "te.txt"},
            "train_list file not found",
        ),
        (
            "bad_stem",
            {"train_list": "tr.txt", "val_list": "va.txt", "test_list": "te.txt"},
            "stems with no image",
        ),
        ("too_few", {}, "cannot fill train, val and test"),
        ("sizes", {}, "set data.augment.resize"),
    ],
)
def test_folder_layout_errors_are_one_line_and_name_the_path(tmp_path, breakage, key, expected):
    root = tmp_path / "data"
    if breakage != "no_root":
        make_folder(root, n=2 if breakage == "too_few" else 4)
    if breakage == "no_masks":
        shutil.rmtree(root / "masks")
    if breakage == "unmatched":
        (root / "masks" / "s01.png").unlink()
    if breakage == "bad_stem":
        (root / "tr.txt").write_text("s00\nnope\n")
        (root / "va.txt").write_text("s01\n")
        (root / "te.txt").write_text("s02\n")
    if breakage == "sizes":
        save(root / "images" / "s03.png", np.zeros((20, 20, 3)))
    with pytest.raises(DataError) as err:
        load_data(cfg("folder", root=str(root), num_classes=3, **key))
    msg = str(err.value)
    assert expected in msg and str(root) in msg and "\n" not in msg


def test_folder_lists_sharing_a_stem_are_a_one_line_config_error(tmp_path):
    make_folder(tmp_path, n=5)
    (tmp_path / "train.txt").write_text("s00\ns01\ns02\n")
    (tmp_path / "val.txt").write_text("s03\n")
    (tmp_path / "test.txt").write_text("s04\ns01.png\n")  # s01 is also a training image
    lists = {"train_list": "train.txt", "val_list": "val.txt", "test_list": "test.txt"}
    with pytest.raises(ConfigError) as err:
        load_data(cfg("folder", root=str(tmp_path), num_classes=3, **lists))
    msg = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in msg
    assert str(tmp_path / "train.txt") in msg and str(tmp_path / "test.txt") in msg
    assert "data.train_list and data.test_list share 1 stem(s) (e.g. s01)" in msg
    (tmp_path / "test.txt").write_text("s04\n")
    assert load_data(cfg("folder", root=str(tmp_path), num_classes=3, **lists)).sizes()["test"] == 1


def test_folder_config_validation():
    with pytest.raises(ValidationError, match="all three"):
        cfg("folder", root="x", num_classes=3, train_list="a.txt")
    with pytest.raises(ValidationError, match="< 1"):
        cfg("folder", root="x", num_classes=3, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValidationError, match="is a class id"):
        cfg("folder", root="x", num_classes=3, ignore_index=1)
    with pytest.raises(ValidationError):
        cfg("folder", root="x", num_classes=1)


def test_folder_resize_stacks_mixed_sizes_in_a_dataloader(tmp_path):
    make_folder(tmp_path, n=6)
    save(tmp_path / "images" / "s05.png", np.zeros((20, 30, 3)))
    save(tmp_path / "masks" / "s05.png", np.ones((20, 30)))
    c = cfg(
        "folder",
        root=str(tmp_path),
        num_classes=3,
        augment={"resize": [8, 10], "hflip": True},
        val_fraction=0.2,
        test_fraction=0.2,
    )
    splits = load_data(c)
    assert not splits.train.deterministic and splits.val.deterministic
    x, y = next(iter(DataLoader(pickle.loads(pickle.dumps(splits.train)), batch_size=4)))
    assert x.shape == (4, 3, 8, 10) and y.shape == (4, 8, 10) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 1, 2}  # nearest: no blended labels


# ---------------------------------------------------------------- transforms


def test_train_transform_moves_image_and_mask_together():
    mask = pattern_mask(10, 12, seed=0)
    image = Image.fromarray(image_from_mask(mask).astype(np.uint8))
    tf = build_transform(AugmentConfig(crop=8, hflip=True, color_jitter=0.0), train=True, in_channels=3)
    torch.manual_seed(0)
    flips = set()
    for _ in range(20):
        x, y = tf(image, Image.fromarray(mask.astype(np.uint8)))
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
        assert torch.equal((x[0] * 255).round().long(), y * 60)
        # the crop is a window of the original or of its mirror image
        m = torch.from_numpy(mask).long()
        windows = [w[r : r + 8, c : c + 8] for w in (m, m.flip(-1)) for r in range(3) for c in range(5)]
        hits = [k for k, w in enumerate(windows) if torch.equal(w, y)]
        assert hits
        flips.add(hits[0] >= 15)
    assert flips == {True, False}


def test_train_crop_pads_mask_with_ignore():
    tf = build_transform(AugmentConfig(crop=(6, 8)), train=True, in_channels=1)
    x, y = tf(Image.fromarray(np.full((4, 4), 200, np.uint8)), np.ones((4, 4), np.uint8))
    assert x.shape == (1, 6, 8) and y.shape == (6, 8)
    assert (y == 1).sum() == 16 and (y == 255).sum() == 6 * 8 - 16
    assert torch.allclose(x[0][y == 1], torch.tensor(200 / 255.0)) and (x[0][y == 255] == 0).all()


def test_eval_transform_is_deterministic_center_crop_without_augmentation():
    mask = pattern_mask(10, 12, seed=1)
    image = Image.fromarray(image_from_mask(mask).astype(np.uint8))
    tf = build_transform(AugmentConfig(crop=6, hflip=True, color_jitter=0.5), train=False, in_channels=3)
    outs = [tf(image, mask) for _ in range(5)]
    for x, y in outs:
        assert torch.equal(y, torch.from_numpy(mask[2:8, 3:9]).long())
        assert torch.equal(x, outs[0][0])
        assert torch.allclose(x[2], torch.from_numpy(mask[2:8, 3:9] * 60 / 255.0).float())


def test_resize_is_height_width_and_nearest_for_masks():
    mask = pattern_mask(10, 12, seed=2, values=(0, 3, 255))
    tf = build_transform(AugmentConfig(resize=(5, 17)), train=False, in_channels=3)
    x, y = tf(Image.fromarray(image_from_mask(mask).astype(np.uint8)), mask)
    assert x.shape == (3, 5, 17) and y.shape == (5, 17)
    assert set(y.unique().tolist()) <= {0, 3, 255}
    x, y = build_transform(AugmentConfig(resize=20), train=False, in_channels=3)(
        Image.new("RGB", (12, 10)), mask
    )
    assert x.shape == (3, 20, 20) and y.shape == (20, 20)


def test_color_jitter_and_normalize_touch_only_the_image():
    mask = pattern_mask(8, 8, seed=3)
    image = Image.fromarray(np.full((8, 8, 3), 128, np.uint8))
    torch.manual_seed(1)
    x, y = build_transform(AugmentConfig(color_jitter=0.8), train=True, in_channels=3)(image, mask)
    assert torch.equal(y, torch.from_numpy(mask).long())
    assert not torch.allclose(x, torch.tensor(128 / 255.0))
    x, _ = build_transform(AugmentConfig(normalize=True), train=False, in_channels=3)(image, mask)
    assert torch.allclose(
        x[:, 0, 0], (128 / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    )
    x, _ = build_transform(AugmentConfig(normalize=True), train=False, in_channels=1)(
        image.convert("L"), mask
    )
    assert torch.allclose(x[0, 0, 0], torch.tensor((128 / 255.0 - 0.449) / 0.226))


def test_augment_config_validation():
    with pytest.raises(ValidationError, match="crop"):
        AugmentConfig(resize=8, crop=10)
    with pytest.raises(ValidationError, match="positive"):
        AugmentConfig(resize=(0, 4))
    assert AugmentConfig(hflip=True).random and not AugmentConfig(resize=8).random


# ---------------------------------------------------------------- voc


def make_voc(
    root: Path,
    train=("2007_000001", "2007_000002"),
    val=("2008_000001", "2008_000002", "2009_000001", "2009_000002"),
):
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(train) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val) + "\n")
    masks = {}
    for k, stem in enumerate((*train, *val)):
        mask = pattern_mask(10, 14, seed=k, values=(0, 5, 20, 255))
        masks[stem] = mask
        save(voc / "JPEGImages" / f"{stem}.jpg", image_from_mask(np.where(mask == 255, 0, mask), step=10))
        save(voc / "SegmentationClass" / f"{stem}.png", mask, palette=True)
    return masks


def test_voc_loads_and_splits_val_in_interleaved_halves(tmp_path):
    masks = make_voc(tmp_path)
    c = cfg("voc", root=str(tmp_path))
    assert c.augment.resize == 256  # default, kept when other augment keys are set
    assert cfg("voc", root=str(tmp_path), augment={"hflip": True}).augment.resize == 256
    splits = load_data(cfg("voc", root=str(tmp_path), augment={"resize": None}))
    assert splits.sizes() == {"train": 2, "val": 2, "test": 2}
    assert (splits.num_classes, splits.in_channels, splits.ignore_index) == (21, 3, 255)
    assert (
        splits.class_names[0] == "background"
        and splits.class_names[15] == "person"
        and len(splits.class_names) == 21
    )
    names = lambda split: [Path(split.base.images[j]).stem for j in split.indices]  # noqa: E731
    assert names(splits.val) == ["2008_000001", "2009_000001"]
    assert names(splits.test) == ["2008_000002", "2009_000002"]
    x, y = splits.test[1]
    assert x.shape == (3, 10, 14) and torch.equal(y, torch.from_numpy(masks["2009_000002"]).long())
    x, y = load_data(c).train[0]
    assert x.shape == (3, 256, 256) and set(y.unique().tolist()) <= {0, 5, 20, 255}


@pytest.mark.parametrize("remove", ["root", "VOCdevkit/VOC2012/SegmentationClass", "split", "image"])
def test_voc_missing_paths_raise_one_line_data_error(tmp_path, remove):
    root = tmp_path / "voc"
    if remove != "root":
        make_voc(root)
    voc = root / "VOCdevkit" / "VOC2012"
    if remove == "VOCdevkit/VOC2012/SegmentationClass":
        shutil.rmtree(voc / "SegmentationClass")
        missing = voc / "SegmentationClass"
    elif remove == "split":
        missing = voc / "ImageSets" / "Segmentation" / "val.txt"
        missing.unlink()
    elif remove == "image":
        missing = voc / "JPEGImages" / "2009_000001.jpg"
        missing.unlink()
    else:
        missing = root
    with pytest.raises(DataError) as err:
        load_data(cfg("voc", root=str(root)))
    msg = str(err.value)
    assert msg.startswith(str(missing)) and "ImageSets/Segmentation" in msg and "set data.root" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- cityscapes

# (labelId, train id): road, sidewalk, person, car, bicycle, unlabeled, ego vehicle, guard rail (void)
LABEL_TO_TRAIN = [(7, 0), (8, 1), (24, 11), (26, 13), (33, 18), (0, 255), (1, 255), (14, 255)]


def make_cityscapes(root: Path, layout=None):
    layout = layout or {"train": {"aachen": 2}, "val": {"frankfurt": 2, "lindau": 2}}
    label_ids = np.array([a for a, _ in LABEL_TO_TRAIN])
    for split, cities in layout.items():
        for city, n in cities.items():
            for k in range(n):
                stem = f"{city}_000000_{k:06d}"
                mask = pattern_mask(8, 16, seed=k + len(city), values=label_ids)
                save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                    image_from_mask(mask, step=3),
                )
                save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", mask)


def test_cityscapes_train_id_lookup_values():
    lut = train_id_lookup()
    assert lut.shape == (256,) and lut.dtype == torch.long
    for label_id, train_id in LABEL_TO_TRAIN:
        assert lut[label_id] == train_id
    assert lut[255] == 255 and lut[34:].eq(255).all()
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))
    names = train_class_names()
    assert len(names) == 19 and names[0] == "road" and names[13] == "car" and names[18] == "bicycle"


def cityscapes_names(split):
    return [Path(split.base.images[j]).name.split("_leftImg8bit")[0] for j in split.indices]


def test_cityscapes_loads_maps_labels_and_splits_val_by_city(tmp_path):
    make_cityscapes(tmp_path)
    splits = load_data(cfg("cityscapes", root=str(tmp_path), augment={"resize": None}))
    assert splits.sizes() == {"train": 2, "val": 2, "test": 2}
    assert (splits.num_classes, splits.in_channels, splits.ignore_index) == (19, 3, 255)
    assert cityscapes_names(splits.val) == ["frankfurt_000000_000000", "frankfurt_000000_000001"]
    assert cityscapes_names(splits.test) == ["lindau_000000_000000", "lindau_000000_000001"]
    x, y = splits.test[0]
    raw = pattern_mask(8, 16, seed=0 + len("lindau"), values=np.array([a for a, _ in LABEL_TO_TRAIN]))
    expected = np.zeros_like(raw)
    for label_id, train_id in LABEL_TO_TRAIN:
        expected[raw == label_id] = train_id
    assert x.shape == (3, 8, 16) and torch.equal(y, torch.from_numpy(expected).long())
    # default resize is (256, 512), height x width
    x, y = load_data(cfg("cityscapes", root=str(tmp_path))).train[0]
    assert x.shape == (3, 256, 512) and set(y.unique().tolist()) <= {0, 1, 11, 13, 18, 255}


def test_cityscapes_val_and_test_share_no_city_and_balance_sizes(tmp_path):
    # the official val set's proportions (frankfurt 267, munster 174, lindau 59), scaled down
    make_cityscapes(tmp_path, {"train": {"aachen": 1}, "val": {"frankfurt": 5, "munster": 3, "lindau": 1}})
    splits = load_data(cfg("cityscapes", root=str(tmp_path), augment={"resize": None}))
    city = lambda split: {n.split("_")[0] for n in cityscapes_names(split)}  # noqa: E731
    assert city(splits.val) == {"frankfurt"} and city(splits.test) == {"lindau", "munster"}
    assert splits.sizes() == {"train": 1, "val": 5, "test": 4}
    assert cityscapes_names(splits.test)[:2] == ["lindau_000000_000000", "munster_000000_000000"]
    make_cityscapes(tmp_path / "one", {"train": {"aachen": 1}, "val": {"frankfurt": 3}})
    with pytest.raises(DataError, match="1 city; .* at least 2") as err:
        load_data(cfg("cityscapes", root=str(tmp_path / "one")))
    assert str(err.value).startswith(str(tmp_path / "one" / "leftImg8bit" / "val"))


@pytest.mark.parametrize("breakage", ["root", "val_labels", "label_file", "no_city"])
def test_cityscapes_missing_paths_raise_one_line_data_error(tmp_path, breakage):
    root = tmp_path / "cs"
    if breakage == "no_city":
        make_cityscapes(root, {"train": {"aachen": 1}, "val": {}})
        (root / "leftImg8bit" / "val").mkdir(parents=True)
        (root / "gtFine" / "val").mkdir(parents=True)
        missing = root / "leftImg8bit" / "val"
    elif breakage != "root":
        make_cityscapes(root)
    if breakage == "root":
        missing = root
    elif breakage == "val_labels":
        missing = root / "gtFine" / "val"
        shutil.rmtree(missing)
    elif breakage == "label_file":
        missing = root / "gtFine" / "train" / "aachen" / "aachen_000000_000001_gtFine_labelIds.png"
        missing.unlink()
    with pytest.raises(DataError) as err:
        load_data(cfg("cityscapes", root=str(root)))
    msg = str(err.value)
    assert msg.startswith(str(missing)) and "gtFine/{train,val}" in msg and "set data.root" in msg
    assert "\n" not in msg


def test_experiment_config_accepts_the_new_sources(tmp_path):
    for data in (
        {"source": "folder", "root": str(tmp_path), "num_classes": 4},
        {"source": "voc", "root": str(tmp_path), "augment": {"crop": 224}},
        {"source": "cityscapes", "root": str(tmp_path)},
    ):
        exp = ExperimentConfig.model_validate({"name": "x", "data": data, "model": {"name": "unet"}})
        assert exp.data.source == data["source"]
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate(
            {"name": "x", "data": {"source": "voc", "root": "r", "year": 2007}, "model": {"name": "unet"}}
        )
