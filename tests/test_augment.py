"""Drawn-parameter augmentation (harness/data/transforms.py): random scale, crop with ignore padding, flip,
colour jitter; parameters drawn from a generator and replayed bit for bit; on small images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import Dataset

from harness.data.loader import iterate_batches
from harness.data.transforms import (
    AugmentConfig,
    AugmentParams,
    PairView,
    apply_params,
    build_transform,
    draw_params,
    resize_mask,
)

STEP = 60  # image value = mask value * STEP: lets a test check that image and mask moved together


def mask_and_image(h: int = 10, w: int = 16, seed: int = 0, values=(0, 1, 2, 3), block: int = 2):
    rng = np.random.default_rng(seed)
    # blocks of pixels, so a scaled image has interiors where bilinear and nearest agree
    small = rng.choice(np.array(values), size=(h // block, w // block))
    mask = np.repeat(np.repeat(small, block, 0), block, 1).astype(np.uint8)
    image = np.stack([mask * STEP] * 3, axis=-1).astype(np.uint8)
    return Image.fromarray(image), Image.fromarray(mask), mask


def test_same_generator_seed_draws_the_same_parameters_and_others_vary():
    cfg = AugmentConfig(scale=(0.5, 2.0), crop=(8, 12), hflip=True, color_jitter=0.3)
    draws = [draw_params(cfg, (10, 16), torch.Generator().manual_seed(s)) for s in range(60)]
    again = [draw_params(cfg, (10, 16), torch.Generator().manual_seed(s)) for s in range(60)]
    assert draws == again
    scales = [p.scale for p in draws]
    assert 0.5 <= min(scales) < 0.7 and 1.8 < max(scales) <= 2.0
    assert {p.flip for p in draws} == {True, False}
    assert len({p.box[:2] for p in draws}) > 10 and len({p.jitter_order for p in draws}) > 2
    for p in draws:
        h, w = p.size
        assert (h, w) == (round(10 * p.scale), round(16 * p.scale))
        top, left, bh, bw = p.box
        assert (bh, bw) == (8, 12) and 0 <= top <= max(h - 8, 0) and 0 <= left <= max(w - 12, 0)
        assert all(0.7 <= j <= 1.3 for j in p.jitter)


def test_scale_step_draws_from_the_grid_including_both_ends():
    cfg = AugmentConfig(scale=(0.5, 2.0), scale_step=0.1)
    g = torch.Generator().manual_seed(0)
    scales = {round(draw_params(cfg, (10, 10), g).scale, 6) for _ in range(400)}
    assert scales == {round(0.5 + 0.1 * k, 6) for k in range(16)}  # CIRKD: 0.5 + randint(0, 15) / 10


def test_outputs_have_the_crop_size_at_every_scale_and_masks_keep_their_values():
    image, mask, raw = mask_and_image()
    tf = build_transform(AugmentConfig(scale=(0.5, 2.0), crop=(8, 12), hflip=True), train=True, in_channels=3)
    torch.manual_seed(0)
    for _ in range(30):
        x, y = tf(image, mask)
        assert x.shape == (3, 8, 12) and x.dtype == torch.float32
        assert y.shape == (8, 12) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= set(np.unique(raw).tolist()) | {255}  # nearest: no blended labels


def test_crop_past_a_shrunk_image_pads_mask_with_ignore_and_image_with_pad_values():
    image, mask, raw = mask_and_image(10, 16)
    pad = [0.2, 0.4, 0.6]
    cfg = AugmentConfig(scale=(0.5, 0.5), crop=(8, 12), pad=pad)
    tf = build_transform(cfg, train=True, in_channels=3)
    params = tf.draw((10, 16), torch.Generator().manual_seed(0))
    assert params.size == (5, 8) and params.box == (0, 0, 8, 12)  # no room to move: the offset is 0
    x, y = tf.apply(image, mask, params)
    assert x.shape == (3, 8, 12) and y.shape == (8, 12)
    assert (y[5:] == 255).all() and (y[:, 8:] == 255).all() and (y[:5, :8] != 255).all()
    assert torch.equal(y[:5, :8], resize_mask(torch.from_numpy(raw).long(), (5, 8)))
    for c, v in enumerate(pad):  # uint8 images are padded with round(v * 255), then scaled to [0, 1]
        assert torch.allclose(x[c][y == 255], torch.tensor(round(v * 255) / 255.0))
    # the mean colour as pad becomes 0 after normalising with that mean (CIRKD pads mean-subtracted images)
    x, _ = build_transform(
        cfg.model_copy(update={"pad": [0.485, 0.456, 0.406], "normalize": True}), True, 3
    ).apply(image, mask, params)
    assert x[:, y == 255].abs().max() < 0.01


def test_image_and_mask_stay_aligned_through_scale_crop_and_flip():
    image, mask, raw = mask_and_image(16, 24, seed=3, values=(0, 1, 2), block=4)
    cfg = AugmentConfig(scale=(2.0, 2.0), crop=(20, 28), hflip=True)
    tf = build_transform(cfg, train=True, in_channels=3)
    big = np.repeat(np.repeat(raw, 2, 0), 2, 1).astype(np.int64)  # the mask at scale 2, by hand
    # pixels whose 5x5 neighbourhood in the scaled mask is one class: there bilinear gives that class's value
    pad = np.pad(big, 2, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
    flat = windows.max(axis=(-1, -2)) == windows.min(axis=(-1, -2))
    seen_flip = set()
    for seed in range(12):
        p = tf.draw((16, 24), torch.Generator().manual_seed(seed))
        x, y = tf.apply(image, mask, p)
        top, left, bh, bw = p.box
        want = big[top : top + bh, left : left + bw]
        interior = flat[top : top + bh, left : left + bw]
        if p.flip:
            want, interior = want[:, ::-1], interior[:, ::-1]
        seen_flip.add(p.flip)
        assert torch.equal(y, torch.from_numpy(want.copy()))
        inside = torch.from_numpy(interior.copy())
        assert inside.float().mean() > 0.2
        assert torch.allclose(x[0][inside] * 255, (y[inside] * STEP).float(), atol=0.5)
    assert seen_flip == {True, False}


def test_stored_parameters_replay_bit_for_bit():
    image, mask, _ = mask_and_image(10, 16, seed=5)
    cfg = AugmentConfig(scale=(0.5, 2.0), crop=(8, 12), hflip=True, color_jitter=0.5, pad=0.3)
    tf = build_transform(cfg, train=True, in_channels=3)
    for seed in range(8):
        params = tf.draw((10, 16), torch.Generator().manual_seed(seed))
        stored = json.loads(json.dumps(params.as_dict()))
        replayed = AugmentParams.from_dict(stored)
        assert replayed == params
        x1, y1 = tf.apply(image, mask, params)
        x2, y2 = build_transform(cfg, train=True, in_channels=3).apply(image, mask, replayed)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # apply_params alone on tensors: the same inputs and parameters give the same bits
    img = torch.randint(0, 256, (3, 10, 16), dtype=torch.uint8)
    m = torch.randint(0, 4, (10, 16))
    p = AugmentParams((17, 23), (3, -2, 8, 12), True, 1.5, (1.2, 0.8, 1.1), (2, 0, 1))
    a, b = apply_params(img, m, p, 0.5), apply_params(img, m, p, 0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[1][:, -2:] == 255).all()  # left offset -2, flipped: the padded columns end up on the right


def test_global_seed_repeats_the_train_transform_and_eval_never_draws():
    image, mask, _ = mask_and_image()
    cfg = AugmentConfig(scale=(0.5, 2.0), crop=(8, 12), hflip=True, color_jitter=0.4)
    tf = build_transform(cfg, train=True, in_channels=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([tf(image, mask) for _ in range(5)])
    for (xa, ya), (xb, yb) in zip(*runs):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(runs[0][0][0], x) for x, _ in runs[0][1:])
    ev = build_transform(cfg, train=False, in_channels=3)
    state = torch.get_rng_state()
    x, y = ev(image, mask)
    assert torch.equal(torch.get_rng_state(), state)  # val/test draw nothing
    assert x.shape == (3, 8, 12)  # centre crop, unscaled
    whole = build_transform(cfg.model_copy(update={"crop_eval": False}), train=False, in_channels=3)
    assert whole(image, mask)[0].shape == (3, 10, 16)  # full-resolution evaluation


class _Pairs(Dataset):
    def __init__(self, n: int):
        self.items = [mask_and_image(10, 16, seed=i)[:2] for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_loader_batches_repeat_with_the_trainers_generator_seed():
    cfg = AugmentConfig(scale=(0.5, 2.0), crop=(8, 12), hflip=True)
    view = PairView(_Pairs(6), range(6), build_transform(cfg, True, 3), deterministic=False)

    def epoch(seed):
        batches = iterate_batches(
            view, 3, device=torch.device("cpu"), shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        return [(x, y) for x, y, _ in batches]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_config_checks_and_dumps():
    with pytest.raises(ValidationError, match="0 < low <= high"):
        AugmentConfig(scale=(2.0, 1.0))
    with pytest.raises(ValidationError, match="scale_step needs scale"):
        AugmentConfig(scale_step=0.1)
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        AugmentConfig(pad=[0.5, 1.5])
    assert AugmentConfig(resize=8, crop=10, scale=(0.5, 2.0)).crop == 10  # padding covers it when scaled
    assert AugmentConfig(scale=(0.5, 2.0)).random and not AugmentConfig(crop_eval=False).random
    assert not AugmentConfig(crop=8, crop_eval=False).fixed_size and AugmentConfig(crop=8).fixed_size
    assert AugmentConfig(crop=8, scale=(0.5, 2.0)).fixed_size  # train crops and eval centre crops: one size
    # fields at their off values stay out of dumps, so configs hashed before they existed keep their hash
    assert AugmentConfig(resize=8, hflip=True).model_dump() == {
        "resize": 8,
        "crop": None,
        "hflip": True,
        "color_jitter": 0.0,
        "normalize": False,
    }
    dumped = AugmentConfig(scale=(0.5, 2.0), crop=(512, 1024), crop_eval=False).model_dump(mode="json")
    assert dumped["scale"] == [0.5, 2.0] and dumped["crop_eval"] is False
    assert AugmentConfig.model_validate(dumped).scale == (0.5, 2.0)
