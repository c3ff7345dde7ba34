import numpy as np
import torch

from harness.data import IGNORE_INDEX, load_data
from harness.data.digits_seg import DigitsSegConfig, source_pools

CFG = DigitsSegConfig(image_size=32, train=40, val=10, test=10, seed=3)


def test_shapes_labels_and_range():
    data = load_data(CFG)
    assert data.task == "segmentation" and data.num_classes == 11 and data.in_channels == 1
    assert data.sizes() == {"train": 40, "val": 10, "test": 10}
    x, y = data.train.images, data.train.targets
    assert x.shape == (40, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (40, 32, 32) and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0
    labels = set(y.unique().tolist())
    assert labels <= set(range(11)) | {IGNORE_INDEX}
    assert 0 in labels and IGNORE_INDEX in labels and len(labels - {0, IGNORE_INDEX}) >= 5
    # every canvas holds at least one digit, and bright pixels are labelled as a digit, dark ones background
    assert ((y > 0) & (y != IGNORE_INDEX)).flatten(1).any(1).all()
    ink = x[:, 0] >= CFG.ink_threshold
    assert ((y[ink] > 0) & (y[ink] != IGNORE_INDEX)).all() and (y[x[:, 0] == 0] == 0).all()


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
    # two digits pasted: at least two connected blobs; count distinct digit classes present is 1 or 2
    n_classes = [len(set(t.unique().tolist()) - {0, IGNORE_INDEX}) for t in y]
    assert all(1 <= n <= 2 for n in n_classes) and max(n_classes) == 2


def test_only_a_thin_band_around_the_ink_is_ignored():
    from harness.data.digits_seg import label_shares

    shares = label_shares(CFG)
    assert shares["ignored"] < 0.06 and shares["digit"] > 0.08
    data = load_data(CFG)
    x, y = data.train.images[:, 0], data.train.targets
    ignored = y == IGNORE_INDEX
    assert (x[ignored] > 0).all() and (x[ignored] < CFG.ink_threshold).all()
    # every ignored pixel touches ink (3x3 neighbourhood): the band is one pixel wide
    ink = (x >= CFG.ink_threshold).float()[:, None]
    near_ink = torch.nn.functional.max_pool2d(ink, 3, stride=1, padding=1)[:, 0] > 0
    assert near_ink[ignored].all()
    none = load_data(CFG.model_copy(update={"boundary": 0}))
    assert not (none.train.targets == IGNORE_INDEX).any()
    assert torch.equal(none.train.targets > 0, (y > 0) & ~ignored)


def test_binary_variant_is_foreground_against_background():
    cfg = CFG.model_copy(update={"binary": True})
    data = load_data(cfg)
    assert data.num_classes == 2 and data.class_names == ["background", "digit"]
    y, y11 = data.train.targets, load_data(CFG).train.targets
    assert set(y.unique().tolist()) == {0, 1, IGNORE_INDEX}
    assert torch.equal(y == 1, (y11 > 0) & (y11 != IGNORE_INDEX)) and torch.equal(
        y == IGNORE_INDEX, y11 == IGNORE_INDEX
    )
