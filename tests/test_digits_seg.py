from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from harness.data import IGNORE_INDEX, load_data
from harness.data.digits_seg import DigitsSegConfig, source_pools

CFG = DigitsSegConfig(image_size=32, train=40, val=10, test=10, seed=3)


def _digit(y: torch.Tensor) -> torch.Tensor:
    return (y > 0) & (y != IGNORE_INDEX)


def test_shapes_labels_and_range():
    data = load_data(CFG)
    assert data.task == "segmentation" and data.num_classes == 11 and data.in_channels == 1
    assert data.class_names[:2] == ["background", "digit 0"] and len(data.class_names) == 11
    assert data.sizes() == {"train": 40, "val": 10, "test": 10}
    x, y = data.train.images, data.train.targets
    assert x.shape == (40, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (40, 32, 32) and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0
    labels = set(y.unique().tolist())
    assert labels <= set(range(11)) | {IGNORE_INDEX}
    assert 0 in labels and IGNORE_INDEX in labels and len(labels - {0, IGNORE_INDEX}) >= 5
    assert _digit(y).flatten(1).any(1).all()  # every canvas holds at least one digit


def test_every_ink_pixel_belongs_to_a_digit_and_nothing_else_does():
    for cfg in (CFG, CFG.model_copy(update={"ink_threshold": 0.5, "boundary": 0})):
        data = load_data(cfg)
        x, y = data.train.images[:, 0], data.train.targets
        assert torch.equal(_digit(y), x > cfg.ink_threshold)


def test_ignored_pixels_are_exactly_the_one_pixel_ring_around_the_ink():
    data = load_data(CFG)
    ink = data.train.images[:, 0] > CFG.ink_threshold
    ring = (F.max_pool2d(ink[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0) & ~ink
    ignored = data.train.targets == IGNORE_INDEX
    assert torch.equal(ignored, ring)
    assert ignored.sum() < ink.sum() and ignored.float().mean() < 0.12  # a thin band, even at 32x32


def test_default_shares_at_full_size():
    """The shares the module docstring and docs/digits_seg.md report (train split, default config)."""
    y = load_data(DigitsSegConfig(train=200, val=1, test=1)).train.targets
    ignored, digit = (y == IGNORE_INDEX).float().mean(), _digit(y).float().mean()
    assert 0.03 < ignored < 0.06 and 0.09 < digit < 0.15


def test_boundary_zero_ignores_nothing():
    y = load_data(CFG.model_copy(update={"boundary": 0})).train.targets
    assert IGNORE_INDEX not in y.unique().tolist()
    with pytest.raises(ValidationError):
        DigitsSegConfig(boundary=2)
    with pytest.raises(ValidationError):
        DigitsSegConfig(ink_threshold=0)


def test_binary_is_foreground_against_background():
    multi, binary = load_data(CFG), load_data(CFG.model_copy(update={"binary": True}))
    assert binary.num_classes == 2 and binary.class_names == ["background", "digit"]
    y = binary.train.targets
    assert set(y.unique().tolist()) == {0, 1, IGNORE_INDEX}
    assert torch.equal(y == 1, _digit(multi.train.targets))
    assert torch.equal(y == IGNORE_INDEX, multi.train.targets == IGNORE_INDEX)
    assert torch.equal(binary.test.images, multi.test.images)
    y0 = load_data(CFG.model_copy(update={"binary": True, "boundary": 0})).train.targets
    assert set(y0.unique().tolist()) == {0, 1}


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b = load_data(CFG), load_data(CFG)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets, b.test.targets)
    c = load_data(CFG.model_copy(update={"seed": 4}))
    assert not torch.equal(a.train.images, c.train.images)


def test_source_digits_disjoint_across_splits():
    pools = source_pools(CFG)
    assert sum(len(p) for p in pools) == 1797
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.intersect1d(pools[i], pools[j]).size


def test_digits_per_canvas_bounds():
    cfg = DigitsSegConfig(image_size=64, min_digits=2, max_digits=2, train=20, val=5, test=5)
    y = load_data(cfg).train.targets
    # two digits pasted: the distinct digit classes present are 1 or 2
    n_classes = [len(set(t.unique().tolist()) - {0, IGNORE_INDEX}) for t in y]
    assert all(1 <= n <= 2 for n in n_classes) and max(n_classes) == 2


def test_every_study_gives_its_teacher_and_students_the_same_data():
    root = Path(__file__).resolve().parents[1]
    pairs = 0
    for path in sorted((root / "studies").glob("*.yaml")):
        study = yaml.safe_load(path.read_text())
        if not str(study.get("teacher", "")).endswith(".yaml"):
            continue
        student, teacher = (yaml.safe_load((root / study[k]).read_text()) for k in ("experiment", "teacher"))
        data = {**student["data"]}
        data.update({k[5:]: v for k, v in (study.get("fixed") or {}).items() if k.startswith("data.")})
        # augment is a training-time transform of the same data (studies/replayed_views.yaml adds one)
        data.pop("augment", None)
        assert data == {k: v for k, v in teacher["data"].items() if k != "augment"}, path.name
        pairs += student["data"]["source"] == "digits_seg"
    assert pairs >= 3
