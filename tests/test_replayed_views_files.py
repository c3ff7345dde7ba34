"""Replayed teacher views (train.teacher_views) for file-backed sources: a tiny folder dataset written here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from harness.config import build_experiment
from harness.data import DATA, load_data
from harness.data import loader as loader_module
from harness.data.loader import iterate_batches
from harness.data.transforms import JointTransform, apply_params, params_row, row_params
from harness.engine import views as views_module
from harness.engine.file_views import FileReplaySplit
from harness.engine.teacher import LiveTeacher, serve_teacher
from harness.errors import DataError
from tests.conftest import write_yaml
from tests.kd_helpers import count_teacher_forwards, fresh_view_stores
from tests.test_data_sources import make_folder, make_voc

AUGMENT = {"scale": [0.75, 1.25], "crop": 8, "hflip": True, "color_jitter": 0.4}
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
KEY = ("teacher", "folder data")


class Counting(nn.Module):
    """A tiny RGB teacher that counts the images it is run on."""

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, classes, 1)
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.head(self.body(x)) * 4


def folder_data(root, **augment) -> dict:
    make_folder(root, n=10)
    aug = {**AUGMENT, **augment}
    return {"source": "folder", "root": str(root), "num_classes": 3, "val_fraction": 0.2, "test_fraction": 0.2,
            "augment": aug}  # fmt: skip


def train_cfg(**kw):
    tree = {"name": "t", "data": {"source": "digits_seg"}, "model": {"name": "unet", "width": 2, "depth": 2}}
    return build_experiment(
        {**tree, "train": {"epochs": 1, "batch_size": 4, "teacher_views": 3, **kw}}, "t"
    ).train


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    fresh_view_stores(tmp_path, monkeypatch)


def serve(teacher, data, **kw):
    return serve_teacher(
        teacher.eval(), ["body"], data, train_cfg(**kw), torch.device("cpu"), NO_AUTOCAST, KEY
    )


def workers(monkeypatch, n: int) -> None:
    """Every DataLoader of the loader module runs with ``n`` worker processes."""
    monkeypatch.setattr(
        loader_module, "DataLoader", lambda *a, **k: DataLoader(*a, **{**k, "num_workers": n})
    )


def test_replayed_file_view_is_apply_params_and_stores_the_live_teachers_outputs(tmp_path):
    data = load_data(DATA.config_class("folder").model_validate(folder_data(tmp_path)))
    teacher = Counting()
    server, served = serve(teacher, data)
    assert served.startswith("replayed views (V=3, device") and not served.endswith("(reused)")
    split = server.split
    assert isinstance(split, FileReplaySplit) and split.rows.shape == (6, 3, 14)
    assert teacher.images == 1 + 6 * 3 + 1  # the shape probe, one forward per stored view, a FLOPs count
    params = [row_params(r) for r in split.rows.reshape(-1, 14)]
    assert all(params_row(p) == r.tolist() for p, r in zip(params, split.rows.reshape(-1, 14)))
    assert len({p.jitter for p in params}) == 18 and {p.flip for p in params} == {False, True}
    split.new_pass(True)
    assert split.current.max() > 0
    base = data.train
    for i in range(len(split)):
        x, y = split[i]
        image, mask = JointTransform.as_tensors(*base.base[base.indices[i]])
        p = row_params(split.rows[i, split.current[i]])
        want_x, want_y = apply_params(image, mask, p, base.transform.cfg.pad, data.ignore_index)
        assert torch.equal(x, TF.to_dtype(want_x, torch.float32, scale=True)) and torch.equal(y, want_y)
    # the stored logits and features of the view each image shows are the live teacher's on that view
    before = teacher.images
    idx = torch.arange(len(split))
    x = torch.stack([split[i][0] for i in idx])
    logits, feats = server(x, idx)
    assert teacher.images == before  # looked up, not run
    live_logits, live_feats = LiveTeacher(teacher, ["body"], NO_AUTOCAST)(x, idx)
    torch.testing.assert_close(logits, live_logits, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(feats["body"], live_feats["body"], rtol=2e-3, atol=2e-3)


def test_view_choice_repeats_across_runs_and_views_survive_a_restart(tmp_path):
    data = load_data(DATA.config_class("folder").model_validate(folder_data(tmp_path)))
    server, _ = serve(Counting(), data)
    views_module._STORES.clear()  # a new process: the parameters are read back from the views folder
    again, served = serve(Counting(), data)
    assert torch.equal(server.split.rows, again.split.rows) and served.endswith("device, 0.0 MB)")

    def choices(seed):
        split = FileReplaySplit(data.train, server.split.rows, seed)
        return [split.choose(True).clone() for _ in range(4)]

    a, b, other = choices(0), choices(0), choices(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, other))
    assert not all(torch.equal(a[0], u) for u in a[1:])  # a new choice each epoch


@pytest.mark.parametrize("n_workers", [0, 2])
def test_dataloader_workers_apply_the_chosen_views(tmp_path, monkeypatch, n_workers):
    workers(monkeypatch, n_workers)
    data = load_data(DATA.config_class("folder").model_validate(folder_data(tmp_path)))
    server, _ = serve(Counting(), data)
    split, g = server.split, torch.Generator().manual_seed(0)
    chosen = []
    for _ in range(2):  # each pass picks its views before the workers start; they apply exactly those
        for x, y, idx in iterate_batches(split, 4, device=torch.device("cpu"), shuffle=True, generator=g):
            assert torch.equal(x, torch.stack([split[int(i)][0] for i in idx]))
            assert torch.equal(y, torch.stack([split[int(i)][1] for i in idx]))
        chosen.append(split.current.clone())
    assert not torch.equal(*chosen) and torch.equal(
        chosen[0], FileReplaySplit(None, split.rows, 0).choose(True)
    )
    with pytest.raises(DataError, match="another view than this pass chose"):
        split.check_views(torch.arange(2), split.current[:2] + 1)


def test_voc_train_split_replays_views(tmp_path):
    make_voc(tmp_path, train=tuple(f"2007_00000{i}" for i in range(4)))
    cfg = {"source": "voc", "root": str(tmp_path), "augment": {"crop": 8, "hflip": True}}
    data = load_data(DATA.config_class("voc").model_validate(cfg))
    server, served = serve(Counting(21), data, teacher_views=2)
    assert served.startswith("replayed views (V=2") and server.split.rows.shape == (4, 2, 14)


@pytest.mark.parametrize("n_workers", [0, 2])
def test_a_cli_run_trains_from_replayed_file_views_without_running_the_teacher(
    tmp_path, store, monkeypatch, n_workers
):
    from mlflow import MlflowClient

    from harness.cli import main
    from harness.engine.teacher import checkpoint_payload
    from harness.models import build_model

    workers(monkeypatch, n_workers)
    tree = {
        "name": "files",
        "data": folder_data(tmp_path / "data"),
        "model": {"name": "unet", "width": 2, "depth": 2},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "seed": 0},
    }
    teacher_cfg = build_experiment(tree, "t")
    data = load_data(teacher_cfg.data)
    model = build_model(teacher_cfg.model, data.in_channels, data.num_classes)
    torch.save(checkpoint_payload(model, teacher_cfg, data), tmp_path / "teacher.pt")
    calls = count_teacher_forwards(monkeypatch)
    student = {**tree, "train": {**tree["train"], "teacher_views": 2}}
    path = write_yaml(
        tmp_path / "student.yaml",
        {**student, "kd": {"method": "response"}, "teacher": str(tmp_path / "teacher.pt")},
    )
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("files").experiment_id])
    assert run.data.tags["teacher.outputs"].startswith("replayed views (V=2, device")
    # the shape probe, the view pass (6 images x 2 views in one batch), one FLOPs count; none while training
    assert calls == [1, 12, 1]
    assert run.data.metrics["teacher_views"] == 2 and run.data.metrics["teacher_cache_flops"] > 0
    assert run.data.metrics["train/kd"] > 0
