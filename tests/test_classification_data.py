"""Classification sources: sklearn digits, Fashion-MNIST / MNIST (idx files), CIFAR-10 (python pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from harness.data import load_data
from harness.data._splits import stratified_split
from harness.data.cifar10 import CIFAR10Config
from harness.data.digits import DigitsConfig, split_indices
from harness.data.fashion_mnist import FashionMNISTConfig
from harness.data.mnist import MNISTConfig
from harness.errors import DataError

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# ---------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format (big-endian magic 0x0000 08 ndim, then int32 dims)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.tobytes())


def fake_idx_root(root: Path, folder: str, n_train: int = 40, n_test: int = 10, seed: int = 0):
    """A tiny MNIST-layout dataset: ROOT/<folder>/raw/ with four uncompressed idx files, balanced labels."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (images, labels)
    return data


def fake_cifar_root(root: Path, per_batch: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    return batches


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- split helper


def test_stratified_split_partitions_every_class():
    labels = np.repeat(np.arange(5), [10, 11, 12, 13, 7])
    parts = stratified_split(labels, [0.6, 0.2, 0.2], seed=3)
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(len(labels)))
    for cls in range(5):
        n = int((labels == cls).sum())
        counts = [int((labels[p] == cls).sum()) for p in parts]
        assert sum(counts) == n
        assert all(abs(c - f * n) <= 1 for c, f in zip(counts, [0.6, 0.2, 0.2], strict=True))


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(np.zeros(10), [0.5, 0.2], seed=0)


# ---------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_sizes():
    splits = load_data(DigitsConfig())
    assert splits.task == "classification"
    assert (splits.num_classes, splits.in_channels) == (10, 1)
    assert splits.class_names == [str(d) for d in range(10)]
    assert sum(splits.sizes().values()) == 1797
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.float32 and part.images.shape[1:] == (1, 8, 8)
        assert part.targets.dtype == torch.long
        assert 0.0 <= part.images.min() and part.images.max() <= 1.0
        assert set(part.targets.tolist()) == set(range(10))
    assert splits.train.images.max() == 1.0


def test_digits_splits_are_disjoint_and_stratified():
    cfg = DigitsConfig(fractions=(0.6, 0.2, 0.2), seed=1)
    parts = split_indices(cfg)
    sets = [set(p.tolist()) for p in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 1797
    splits = load_data(cfg)
    all_targets = torch.cat([splits.train.targets, splits.val.targets, splits.test.targets])
    for cls in range(10):
        n = int((all_targets == cls).sum())
        for part, frac in ((splits.train, 0.6), (splits.val, 0.2), (splits.test, 0.2)):
            assert abs(int((part.targets == cls).sum()) - frac * n) <= 1


def test_digits_is_deterministic_for_a_seed():
    a, b, c = (
        load_data(DigitsConfig(seed=7)),
        load_data(DigitsConfig(seed=7)),
        load_data(DigitsConfig(seed=8)),
    )
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets, b.test.targets)
    assert not torch.equal(a.train.targets, c.train.targets)


def test_digits_upsampled_to_28_for_the_mlp():
    splits = load_data(DigitsConfig(image_size=28))
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert 0.0 <= splits.train.images.min() and splits.train.images.max() <= 1.0


def test_digits_normalize_uses_train_statistics():
    splits = load_data(DigitsConfig(normalize=True))
    assert abs(float(splits.train.images.mean())) < 1e-4
    assert abs(float(splits.train.images.std()) - 1.0) < 1e-3


def test_digits_config_rejects_bad_fractions():
    with pytest.raises(ValidationError, match="fractions"):
        DigitsConfig(fractions=(0.6, 0.3, 0.3))


def test_experiment_config_accepts_classification_blocks():
    from harness.config import ExperimentConfig

    cfg = ExperimentConfig(
        name="t", data={"source": "digits", "image_size": 28}, model={"name": "mlp", "hidden": [400]}
    )
    assert isinstance(cfg.data, DigitsConfig)
    cfg = ExperimentConfig(
        name="t", data={"source": "fashion_mnist", "limit_train": 1000}, model={"name": "mlp"}
    )
    assert isinstance(cfg.data, FashionMNISTConfig) and cfg.data.root == "data"


# ---------------------------------------------------------------- Fashion-MNIST and MNIST from idx files


@pytest.mark.parametrize("config_cls, folder", [(FashionMNISTConfig, "FashionMNIST"), (MNISTConfig, "MNIST")])
def test_idx_sources_load_a_tiny_fake_root(tmp_path, config_cls, folder):
    written = fake_idx_root(tmp_path, folder, n_train=40, n_test=10)
    splits = load_data(config_cls(root=str(tmp_path), val_fraction=0.25))
    assert splits.sizes() == {"train": 30, "val": 10, "test": 10}
    assert (splits.num_classes, splits.in_channels, splits.task) == (10, 1, "classification")
    assert len(splits.class_names) == 10
    for part in (splits.train, splits.val, splits.test):
        assert part.images.shape[1:] == (1, 28, 28) and part.images.dtype == torch.float32
        assert part.targets.dtype == torch.long
        assert 0.0 <= part.images.min() and part.images.max() <= 1.0
    images, labels = written["t10k"]
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(images).float() / 255)
    assert splits.test.targets.tolist() == labels.tolist()
    # train + val are the official train set, disjoint, each class split 3:1
    train_images, _ = written["train"]
    seen = {
        bytes((img[0] * 255).round().byte().numpy())
        for img in torch.cat([splits.train.images, splits.val.images])
    }
    assert seen == {bytes(img) for img in train_images}
    assert torch.bincount(splits.val.targets, minlength=10).tolist() == [1] * 10


def test_fashion_limit_train_is_a_stratified_subsample(tmp_path):
    fake_idx_root(tmp_path, "FashionMNIST", n_train=40)
    splits = load_data(FashionMNISTConfig(root=str(tmp_path), val_fraction=0.25, limit_train=10))
    assert splits.sizes() == {"train": 10, "val": 10, "test": 10}
    assert torch.bincount(splits.train.targets, minlength=10).tolist() == [1] * 10
    again = load_data(FashionMNISTConfig(root=str(tmp_path), val_fraction=0.25, limit_train=10))
    assert torch.equal(splits.train.images, again.train.images)


def test_fashion_missing_root_names_path_layout_and_fix(tmp_path):
    with pytest.raises(DataError) as exc:
        load_data(FashionMNISTConfig(root=str(tmp_path / "nowhere")))
    message = assert_one_line(exc)
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw") in message
    assert "ROOT/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed)" in message
    assert "make data" in message and "dataset-fashion-mnist" in message


def test_fashion_gz_only_says_gunzip(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_NAMES:
        (raw / f"{name}.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError) as exc:
        load_data(FashionMNISTConfig(root=str(tmp_path)))
    assert "gunzip" in assert_one_line(exc)


def test_fashion_unreadable_file_is_a_data_error(tmp_path):
    fake_idx_root(tmp_path, "FashionMNIST")
    (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError) as exc:
        load_data(FashionMNISTConfig(root=str(tmp_path)))
    assert "could not be read" in assert_one_line(exc)


def test_mnist_missing_says_it_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError) as exc:
        load_data(MNISTConfig(root=str(tmp_path)))
    message = assert_one_line(exc)
    assert "ROOT/MNIST/raw/" in message and "cannot be downloaded" in message


@pytest.mark.skipif(
    not (REPO_DATA / "FashionMNIST" / "raw" / IDX_NAMES[0]).is_file(), reason="run `make data` first"
)
def test_real_fashion_mnist_when_unpacked():
    splits = load_data(FashionMNISTConfig(root=str(REPO_DATA), limit_train=1000))
    assert splits.sizes() == {"train": 1000, "val": 10000, "test": 10000}
    assert splits.class_names[0] == "T-shirt/top"
    assert torch.bincount(splits.test.targets).tolist() == [1000] * 10
    assert splits.train.images.shape[1:] == (1, 28, 28)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_missing_names_the_folder(tmp_path):
    with pytest.raises(DataError) as exc:
        load_data(CIFAR10Config(root=str(tmp_path)))
    message = assert_one_line(exc)
    assert "cifar-10-batches-py" in message and str(tmp_path) in message


def test_cifar_checksum_failure_is_a_data_error(tmp_path):
    fake_cifar_root(tmp_path)  # valid pickles, but not the real files: torchvision's md5 check fails
    with pytest.raises(DataError) as exc:
        load_data(CIFAR10Config(root=str(tmp_path)))
    assert "md5" in assert_one_line(exc)


def test_cifar_loads_when_the_check_passes(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    batches = fake_cifar_root(tmp_path, per_batch=10)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # skip the md5 check
    splits = load_data(CIFAR10Config(root=str(tmp_path), val_fraction=0.2))
    assert splits.sizes() == {"train": 40, "val": 10, "test": 10}
    assert (splits.in_channels, splits.num_classes) == (3, 10)
    assert splits.class_names[0] == "airplane"
    data, labels = batches["test_batch"]
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(splits.test.images, expected)
    assert splits.test.targets.tolist() == labels
