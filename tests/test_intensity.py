"""Images deeper than 8 bits (16-bit PNG and TIFF, written here) are scaled, not clipped at 255, through the
folder source and ``harness.data.intensity``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from pydantic import ValidationError

from harness.data import DATA, load_data
from harness.data.intensity import IntensityConfig, read_image, scale_intensity
from harness.errors import DataError

H, W = 6, 8


def ramp(high: int = 65535) -> np.ndarray:
    """uint16 (H, W) from 0 to ``high``: most values are far above 255."""
    return np.linspace(0, high, H * W).round().astype(np.uint16).reshape(H, W)


def folder(root: Path, images: dict[str, np.ndarray], ext: str, **kw):
    """A folder dataset of the given images (written as 16-bit files) and all-zero masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, image in images.items():
        path = root / "images" / f"{stem}{ext}"
        if ext == ".png":
            Image.fromarray(image).save(path)
        else:
            tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack")
        Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "masks" / f"{stem}.png")
    stems = list(images)
    for key, part in (("train", stems[:-2]), ("val", stems[-2:-1]), ("test", stems[-1:])):
        (root / f"{key}.txt").write_text("\n".join(part) + "\n")
    lists = {"train_list": "train.txt", "val_list": "val.txt", "test_list": "test.txt"}
    cfg = DATA.config_class("folder").model_validate(
        {"source": "folder", "root": str(root), "num_classes": 2, **lists, **kw}
    )
    return load_data(cfg)


def train_image(splits, stem: str) -> torch.Tensor:
    base = splits.train.base
    j = next(j for j, (p, _) in enumerate(base.pairs) if p.stem == stem)
    return splits.train.transform(*base[j])[0]


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_grayscale_is_scaled_by_its_range_not_clipped(tmp_path, ext):
    a = ramp()
    splits = folder(tmp_path, {"a": a, "b": a // 2, "c": a, "d": a}, ext, in_channels=1)
    x = train_image(splits, "a")
    assert x.shape == (1, H, W) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(a / 65535.0).float())
    assert (x < 1).float().mean() > 0.9  # Pillow's convert("L") made every pixel above 255 white
    torch.testing.assert_close(train_image(splits, "b")[0], torch.from_numpy((a // 2) / 65535.0).float())


def test_16_bit_rgb_tiff_to_one_channel_by_luma_and_gray_to_three(tmp_path):
    a = ramp()
    rgb = np.stack([a, a // 2, a // 4], axis=-1)
    x = train_image(folder(tmp_path / "g", {"a": rgb, "b": rgb, "c": rgb}, ".tif", in_channels=1), "a")
    expected = (0.299 * a + 0.587 * (a // 2) + 0.114 * (a // 4)) / 65535.0
    torch.testing.assert_close(x[0], torch.from_numpy(expected).float())
    x = train_image(folder(tmp_path / "c", {"a": a, "b": a, "c": a}, ".tif", in_channels=3), "a")
    assert x.shape == (3, H, W) and torch.equal(x[0], x[2])
    torch.testing.assert_close(x[1], torch.from_numpy(a / 65535.0).float())


def test_percentile_mode_stretches_each_image_and_clips(tmp_path):
    dim = ramp(4095)  # a 12-bit camera's values in a 16-bit file
    splits = folder(
        tmp_path,
        {"a": dim, "b": dim * 2, "c": dim, "d": np.full((H, W), 700, np.uint16)},
        ".tif",
        in_channels=1,
        intensity={"mode": "percentile", "low": 10, "high": 90},
    )
    lo, hi = np.percentile(dim.astype(np.float64), [10, 90])
    x = train_image(splits, "a")[0]
    torch.testing.assert_close(x, torch.from_numpy(np.clip((dim - lo) / (hi - lo), 0, 1)).float())
    assert x.min() == 0 and x.max() == 1 and (x == 0).sum() >= 4 and (x == 1).sum() >= 4
    torch.testing.assert_close(train_image(splits, "b")[0], x)  # per image: twice as bright reads the same
    assert torch.equal(splits.test[0][0], torch.zeros(1, H, W))  # a constant image


def test_dtype_mode_keeps_8_bit_files_as_before_and_percentile_applies_to_them_too():
    cfg = IntensityConfig()
    assert scale_intensity(np.array([0, 255], np.uint8), cfg).tolist() == [0.0, 1.0]
    assert scale_intensity(np.array([-32768, 32767], np.int16), cfg).tolist() == [0.0, 1.0]
    torch.testing.assert_close(
        scale_intensity(np.array([0.0, 5.0, 10.0]), IntensityConfig(mode="percentile", low=0, high=100)),
        np.array([0.0, 0.5, 1.0], np.float32),
    )
    with pytest.raises(ValueError, match="mode: percentile"):
        scale_intensity(np.zeros(3, np.float32), cfg)
    with pytest.raises(ValidationError, match="below"):
        IntensityConfig(mode="percentile", low=50, high=50)


def test_8_bit_images_read_as_uint8_exactly_as_pillow_converts_them(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    for ext in (".png", ".tif"):
        Image.fromarray(rgb).save(tmp_path / f"x{ext}")
        x = read_image(tmp_path / f"x{ext}", 1, IntensityConfig())
        assert x.dtype == torch.uint8
        assert torch.equal(x[0], torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))))


def test_lzw_16_bit_tiff_without_imagecodecs_is_read_by_pillow(tmp_path):
    a = ramp()
    Image.fromarray(a).save(tmp_path / "x.tif", compression="tiff_lzw")
    x = read_image(tmp_path / "x.tif", 1, IntensityConfig())
    torch.testing.assert_close(x[0], torch.from_numpy(a / 65535.0).float())


def test_unusable_deep_images_name_the_file_and_the_fix(tmp_path):
    tifffile.imwrite(tmp_path / "float.tif", np.ones((H, W), np.float32))
    with pytest.raises(DataError, match=r"float\.tif: float32 pixels .* data\.intensity\.mode: percentile"):
        read_image(tmp_path / "float.tif", 1, IntensityConfig())
    assert read_image(tmp_path / "float.tif", 1, IntensityConfig(mode="percentile")).shape == (1, H, W)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, H, W), np.uint16))
    with pytest.raises(DataError, match=r"stack\.tif: image has shape \(5, 6, 8\).*one"):
        read_image(tmp_path / "stack.tif", 1, IntensityConfig())


def test_default_intensity_is_left_out_of_dumps(tmp_path):
    config = DATA.config_class("folder")
    plain = config(root="r", num_classes=2).model_dump(mode="json")
    assert "intensity" not in plain and "normalize" not in plain
    given = config(root="r", num_classes=2, intensity={"mode": "percentile"}).model_dump(mode="json")
    assert given["intensity"] == {"mode": "percentile", "low": 1.0, "high": 99.8}
    assert config.model_validate(given).intensity.mode == "percentile"
