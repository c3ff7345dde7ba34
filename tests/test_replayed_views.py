"""Replayed teacher views (train.teacher_views) and device augmentation of in-memory sources (issue 25)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config import build_experiment
from harness.data.base import DataSplits, TensorSplit
from harness.data.device_augment import TensorAugmentConfig, augment_in_memory, unpack
from harness.data.loader import iterate_batches
from harness.data.transforms import apply_params
from harness.engine import views as views_module
from harness.engine.teacher import LiveTeacher, serve_teacher
from harness.engine.views import estimate_bytes, from_top_k, stored_shapes, top_k
from harness.errors import ConfigError
from tests.conftest import TINY_DATA, TINY_TRAIN
from tests.kd_helpers import count_teacher_forwards, fresh_view_stores

AUGMENT = {"scale": [0.75, 1.25], "crop": 16, "hflip": True}
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
KEY = ("teacher", "data")


class Counting(nn.Module):
    """A tiny teacher that counts the images it is run on."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, classes, 1)
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.head(self.body(x)) * 4


def tiny_data(n: int = 12, size: int = 16) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, size, size, generator=g), torch.randint(0, 5, (n, size, size), generator=g)
    split = TensorSplit(x, y)
    data = DataSplits("segmentation", split, split, split, num_classes=5, in_channels=1)
    return augment_in_memory(data, TensorAugmentConfig(**AUGMENT))


def train_cfg(**kw):
    return build_experiment(
        {
            "name": "t",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 2},
            "train": {**TINY_TRAIN, "batch_size": 4, "teacher_views": 3, **kw},
        },
        "t",
    ).train


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    fresh_view_stores(tmp_path, monkeypatch)


def serve(teacher, data, layers=("body",), **kw):
    return serve_teacher(
        teacher.eval(), list(layers), data, train_cfg(**kw), torch.device("cpu"), NO_AUTOCAST, KEY
    )


def test_device_views_are_the_transform_views_and_crop_flip_exactly():
    """apply_views (batched, on the device) agrees with transforms.apply_params: masks exactly; images
    exactly without a scale, to float tolerance when upscaled (shrinking: apply_params antialiases)."""
    split = tiny_data().train
    rows = split.draw(12, torch.Generator().manual_seed(1))
    x, y = split.views(torch.arange(12), rows)
    for i, row in enumerate(rows):
        xi, yi = apply_params(split.base.images[i], split.base.targets[i], unpack(row), 0.0, 255)
        assert torch.equal(yi, y[i])
        if row[0] >= 16:
            assert torch.allclose(xi, x[i], atol=1e-5)
    flips = torch.tensor([[16, 16, 0, 0, 16, 16, 1]])
    fx, fy = split.views(torch.tensor([3]), flips)
    assert torch.equal(fx[0], split.base.images[3].flip(-1)) and torch.equal(
        fy[0], split.base.targets[3].flip(-1)
    )
    assert (y == 255).any()  # shrunk views are padded with the ignore index


def test_augment_config_refuses_what_in_memory_sources_cannot_do():
    with pytest.raises(ConfigError, match=r"data.augment: .*remove \['color_jitter'\]"):
        build_experiment(
            {"name": "t", "data": {**TINY_DATA, "augment": {"color_jitter": 0.2}}, "model": {"name": "unet"}},
            "t",
        )
    cfg = build_experiment({"name": "t", "data": TINY_DATA, "model": {"name": "unet"}}, "t")
    assert "augment" not in cfg.model_dump(mode="json")["data"]  # unset: the config hash is as before


def test_replayed_view_equals_the_live_teacher_on_that_view():
    data, teacher = tiny_data(), Counting()
    server, served = serve(teacher, data)
    assert served.startswith("replayed views (V=3, device,")
    live = LiveTeacher(teacher, ["body"], NO_AUTOCAST)
    split, seen = server.split, set()
    for epoch in range(3):
        for x, y, idx in iterate_batches(
            split, 4, device=torch.device("cpu"), shuffle=True, generator=torch.Generator().manual_seed(epoch)
        ):
            rows = server.split.rows[idx, split.current[idx]]
            x2, y2 = data.train.views(idx, rows)  # the same view drawn by the augmentation
            assert torch.equal(x, x2) and torch.equal(y, y2)
            stored, feats = server(x, idx)
            want, want_feats = live(x, idx)
            assert torch.allclose(stored, want, atol=2e-2, rtol=1e-3)  # fp16 storage
            assert torch.allclose(feats["body"], want_feats["body"], atol=2e-3, rtol=1e-3)
            seen.update(zip(idx.tolist(), split.current[idx].tolist()))
    assert len({v for _, v in seen}) == 3  # every stored view is replayed


def test_view_choice_is_seeded_and_views_are_drawn_from_the_view_seed():
    data = tiny_data()
    a, _ = serve(Counting(), data)
    picks = [a.split.pass_rows(True).clone() for _ in range(3)]
    views_module._STORES.clear()
    b, _ = serve(Counting(), data)
    assert all(torch.equal(p, b.split.pass_rows(True)) for p in picks)
    c, _ = serve(Counting(), data, seed=1)  # another run seed: same views, other choices
    assert torch.equal(c.split.rows, a.split.rows) and not torch.equal(c.split.pass_rows(True), picks[0])
    d, _ = serve(Counting(), data, teacher_views_seed=5)
    assert not torch.equal(d.split.rows, a.split.rows)


def test_a_restart_reuses_the_stored_views_and_memmapped_outputs(tmp_path):
    data, teacher = tiny_data(), Counting()
    first, served = serve(teacher, data, teacher_cache_gb=1e-6)  # over the device budget: memory-mapped
    assert "memory-mapped" in served
    assert teacher.images == 1 + 12 * 3 + 1  # a probe for the shapes, each view once, its FLOPs counted
    files = sorted(p.name for p in (tmp_path / "views").rglob("*") if p.is_file())
    assert "views.pt" in files and "logits.bin" in files and "complete.json" in files
    assert first.metrics["teacher_cache_flops"] > 0
    views_module._STORES.clear()  # a new process
    again, served = serve(teacher, data, teacher_cache_gb=1e-6)
    assert served.endswith("(reused)") and again.metrics["teacher_cache_flops"] == 0
    assert teacher.images == 38 + 1  # only the probe: the outputs come from the files
    idx, view = torch.arange(12), torch.randint(3, (12,))
    assert torch.equal(again.store.lookup(idx, view)[0], first.store.lookup(idx, view)[0])
    assert torch.equal(again.split.rows, first.split.rows)


def test_memory_estimate_is_what_the_store_allocates():
    data = tiny_data()
    for topk in (None, 2):
        views_module._STORES.clear()
        server, _ = serve(Counting(), data, teacher_views_topk=topk)
        shapes = stored_shapes(torch.Size([5, 16, 16]), {"body": torch.Size([4, 16, 16])}, topk)
        assert (
            server.store.nbytes
            == estimate_bytes(12, 3, shapes)
            == sum(t.numel() * t.element_size() for t in server.store.tensors.values())
        )
    assert estimate_bytes(12, 3, stored_shapes(torch.Size([5, 16, 16]), {}, None)) == 12 * 3 * 5 * 256 * 2


def test_top_k_keeps_the_top_classes_and_spreads_the_rest():
    logits = torch.randn(2, 6, 4, 4) * 3
    approx = from_top_k(*top_k(logits, 2).values(), classes=6)
    p, q = logits.softmax(1), approx.softmax(1)
    top = logits.topk(2, dim=1).indices
    assert torch.allclose(q.gather(1, top), p.gather(1, top), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(2, 4, 4), atol=1e-6)
    rest = 1 - p.gather(1, top).sum(1)
    others = q.sum(1) - q.gather(1, top).sum(1)
    assert torch.allclose(others, rest, atol=1e-6)
    mask = torch.ones_like(q, dtype=torch.bool).scatter_(1, top, False).permute(0, 2, 3, 1)
    spread = q.permute(0, 2, 3, 1).masked_select(mask).view(2, 4, 4, 4)  # the 4 other classes per pixel
    assert torch.allclose(spread.amax(-1), spread.amin(-1), atol=1e-7)  # evenly


def test_top_k_effect_on_the_response_loss_shrinks_with_k():
    from harness.distill import KD_METHODS
    from harness.distill.base import KDBatch

    kd = KD_METHODS.build(KD_METHODS.config_class("response")(temperature=2.0))
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 11, 8, 8, generator=g) * 4, torch.randn(4, 11, 8, 8, generator=g)
    y = torch.zeros(4, 8, 8, dtype=torch.long)
    full = float(kd(KDBatch(student, y, teacher))["kd"])
    errors = [
        abs(float(kd(KDBatch(student, y, from_top_k(*top_k(teacher, k).values(), 11)))["kd"]) - full) / full
        for k in (1, 3, 11)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_without_an_in_memory_source_views_fall_back_to_live_with_one_line(capsys):
    class Files(torch.utils.data.Dataset):
        deterministic = False

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1, 16, 16), torch.zeros(16, 16, dtype=torch.long)

    split = Files()
    data = DataSplits("segmentation", split, split, split, num_classes=5, in_channels=1)
    server, served = serve(Counting(), data)
    assert isinstance(server, LiveTeacher) and served.startswith(
        "live (train.teacher_views needs an in-memory"
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: train.teacher_views needs") and line.endswith("the teacher runs live")


def test_a_kd_run_trains_from_replayed_views_without_running_the_teacher(tmp_path, store, monkeypatch):
    """End to end: tags, the one-off pass as teacher_cache_flops, and no teacher forward while training."""
    from harness.data import load_data
    from harness.engine.evaluate import count_flops
    from harness.engine.run import run_experiment
    from harness.engine.teacher import checkpoint_payload
    from harness.models import build_model
    from harness.tracking import Tracker

    tree = {
        "name": "s",
        "data": {**TINY_DATA, "augment": {"hflip": True, "crop": 28}},
        "model": {"name": "unet", "width": 2, "depth": 2},
        "train": {**TINY_TRAIN, "teacher_views": 2},
    }
    teacher_cfg = build_experiment(
        {**tree, "model": {"name": "unet", "width": 2, "depth": 2}, "train": TINY_TRAIN}, "t"
    )
    data = load_data(teacher_cfg.data)
    teacher = build_model(teacher_cfg.model, data.in_channels, data.num_classes)
    torch.save(checkpoint_payload(teacher, teacher_cfg, data), tmp_path / "teacher.pt")
    calls = count_teacher_forwards(monkeypatch)
    cfg = build_experiment(
        {**tree, "kd": {"method": "response"}, "teacher": str(tmp_path / "teacher.pt")}, "s"
    )
    tracker = Tracker(store)
    outcome = run_experiment(cfg, tracker, experiment="replay")
    assert outcome.state == "finished"
    (record,) = [r for _, r in tracker.runs_frame(["replay"]).iterrows()]
    assert record["tags.teacher.outputs"].startswith("replayed views (V=2, device")
    pass_images = 48 * 2
    # a probe for the store's shapes, the view pass, one FLOPs count; nothing while training
    assert calls == [1, 48, 48, 1]
    x = data.train.images[:1, :, :28, :28]
    assert record["metrics.teacher_cache_flops"] == count_flops(teacher, x) * pass_images
    assert record["metrics.train/kd"] > 0


def test_a_store_with_no_room_falls_back_to_live_with_its_size(monkeypatch, capsys):
    monkeypatch.setattr(views_module, "place", lambda need, gb, root: None)
    server, served = serve(Counting(), tiny_data())
    assert isinstance(server, LiveTeacher)
    assert served.startswith(
        "live (teacher views: 12 images x 3 views (logits 5x16x16, body 4x16x16; fp16) ="
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "more than train.teacher_cache_gb" in line and line.endswith("the teacher runs live")


@pytest.mark.parametrize(
    "method",
    [
        {"method": "response", "temperature": 4.0},
        {"method": "response", "standardize": True},
        {"method": "dist"},
        {"method": "dist", "standardize": True},
        {"method": "cwd"},
    ],
)
def test_logit_methods_get_the_live_teachers_loss_from_replayed_views(method):
    from harness.distill import KD_METHODS
    from harness.distill.base import KDBatch

    cfg = KD_METHODS.config_class(method["method"])(**{k: v for k, v in method.items() if k != "method"})
    kd = KD_METHODS.build(cfg)
    kd.choose_layers([], [])
    data, teacher = tiny_data(), Counting()
    server, _ = serve(teacher, data, layers=())
    live = LiveTeacher(teacher, [], NO_AUTOCAST)
    student = torch.randn(12, 5, 16, 16, generator=torch.Generator().manual_seed(3))
    split = server.split
    idx = torch.arange(12)
    x, y = split.views(idx, split.pass_rows(True)[idx])
    replayed, want = server(x, idx)[0], live(x, idx)[0]
    for name, value in kd(KDBatch(student, y, replayed)).items():
        assert float(value) == pytest.approx(float(kd(KDBatch(student, y, want))[name]), rel=2e-3, abs=1e-5)
