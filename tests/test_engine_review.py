"""Engine fixes from review issue 21: the selection metric, teacher-cache accounting, KD FLOPs, timing tags,
the fp32 CPU cache, dead teacher runs, per-class IoU, teacher lookup, and the trivial predictor's score."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.config import build_experiment
from harness.data import load_data
from harness.distill import KD_METHODS
from harness.distill.base import Distiller
from harness.engine import fit as fit_module
from harness.errors import ConfigError
from harness.models import build_model
from tests.conftest import TINY_DATA, TINY_TRAIN


def experiment(train: dict | None = None, **extra):
    tree = {
        "name": "t",
        "data": TINY_DATA,
        "model": {"name": "unet", "width": 2, "depth": 3},
        "train": {**TINY_TRAIN, **(train or {})},
        **extra,
    }
    return build_experiment(tree, "t")


# --- item 5: the best epoch, early stopping and plateau follow train.select_on ---------------------------


def test_select_on_rejects_an_unknown_metric_in_one_line():
    with pytest.raises(ConfigError) as err:
        experiment({"select_on": "val/iou"})
    message = str(err.value)
    assert "\n" not in message and "train.select_on" in message and "'val/loss'" in message


def test_select_on_must_be_logged_by_the_task():
    cfg = experiment({"select_on": "val/accuracy"})
    with pytest.raises(ConfigError, match="segmentation runs log"):
        fit_module.selection(cfg.train, "segmentation")


def test_select_on_unset_keeps_the_config_hash():
    # computed before select_on existed: teachers trained then are still found by their hash
    cfg = experiment(model={"name": "unet", "width": 4, "depth": 3})
    assert cfg.hash() == "2cf6a2012e61168f"
    assert experiment({"select_on": "val/loss"}).hash() != experiment().hash()


def scripted_fit(monkeypatch, train: dict, vals: list[dict]):
    """Fit a tiny UNet for real, with validation results replaced by ``vals`` (one dict per epoch)."""
    cfg = experiment({"epochs": len(vals), **train})
    data = load_data(cfg.data)
    script = iter(vals)
    monkeypatch.setattr(fit_module, "validate", lambda *a, **k: {"pixel_acc": 0.5, **next(script)})
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    distiller = KD_METHODS.build(cfg.kd)
    return fit_module.fit(model, data, cfg, device=torch.device("cpu"), distiller=distiller)


VALS = [
    {"miou": 0.1, "loss": 1.0},
    {"miou": 0.5, "loss": 0.9},
    {"miou": 0.3, "loss": 0.5},
    {"miou": 0.2, "loss": 0.8},
]


@pytest.mark.parametrize(("select_on", "best"), [(None, 1), ("val/miou", 1), ("val/loss", 2)])
def test_best_epoch_follows_select_on(monkeypatch, select_on, best):
    result = scripted_fit(monkeypatch, {"select_on": select_on}, VALS)
    assert result.best_epoch == best and result.best_val["loss"] == VALS[best]["loss"]


def test_early_stopping_follows_select_on(monkeypatch):
    # the loss gets worse at epoch 1 while mIoU improves: selecting on the loss stops there
    vals = [{"miou": 0.1, "loss": 1.0}, {"miou": 0.2, "loss": 1.1}, {"miou": 0.3, "loss": 1.2}]
    by_loss = scripted_fit(monkeypatch, {"select_on": "val/loss", "early_stopping": 1}, vals)
    by_miou = scripted_fit(monkeypatch, {"early_stopping": 1}, vals)
    assert len(by_loss.history) == 2 and by_loss.best_epoch == 0
    assert len(by_miou.history) == 3 and by_miou.best_epoch == 2


def test_plateau_scheduler_follows_select_on(monkeypatch):
    # a falling loss is progress when minimised: the learning rate stays; a flat mIoU is a plateau
    vals = [{"miou": 0.2, "loss": 1.0 - 0.1 * e} for e in range(5)]
    by_loss = scripted_fit(monkeypatch, {"scheduler": "plateau", "select_on": "val/loss"}, vals)
    by_miou = scripted_fit(monkeypatch, {"scheduler": "plateau"}, vals)
    assert [h["lr"] for h in by_loss.history] == [TINY_TRAIN["lr"]] * 5
    assert by_miou.history[-1]["lr"] < TINY_TRAIN["lr"]


# --- item 9: KD FLOPs count forward-only work once -------------------------------------------------------


class HintWithTeacherMap(Distiller):
    """A trained 1x1 adapter on the student's feature (forward and backward) plus a similarity map of the
    teacher's feature (forward only)."""

    def __init__(self):
        super().__init__(KD_METHODS.config_class("none")())
        self.student_layers, self.teacher_layers = ["0"], ["t"]
        self.adapter = nn.Conv2d(3, 5, 1, bias=False)

    def forward(self, batch):
        t = batch.teacher_features["t"].flatten(2)  # N, C, HW
        similarity = t.transpose(1, 2) @ t  # N, HW, HW
        hint = (self.adapter(batch.student_features["0"]) - batch.teacher_features["t"]).pow(2).mean()
        return {"hint": hint, "sim": 0.0 * similarity.mean()}


def test_kd_flops_count_the_backward_only_where_there_is_one():
    from harness.data.base import DataSplits, TensorSplit
    from harness.engine.compute import measure_step_cost

    n, h, w = 2, 4, 6
    split = TensorSplit(torch.randn(n, 1, h, w), torch.zeros(n, h, w, dtype=torch.long))
    data = DataSplits("segmentation", split, split, split, num_classes=2, in_channels=1)
    student = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 2, 1))
    t_feat = torch.randn(n, 5, h, w)
    server = lambda x, idx: (torch.randn(n, 2, h, w), {"t": t_feat})  # noqa: E731
    distiller = HintWithTeacherMap()
    cost = measure_step_cost(student, distiller, server, None, data, n, torch.device("cpu"))
    adapter = 2 * h * w * 3 * 5  # multiply-adds of the 1x1 conv, per image
    similarity = 2 * (h * w) * (h * w) * 5
    assert cost.kd == 3 * adapter + similarity
    assert all(p.grad is None for p in distiller.parameters())  # measuring leaves no gradients behind


# --- item 8: the run that builds the teacher cache logs its cost at once -----------------------------------


class Stop(Exception):
    pass


def test_teacher_cache_cost_is_logged_by_a_run_pruned_after_building_it(tmp_path, store, monkeypatch):
    from harness.engine import teacher as teacher_module
    from harness.engine.evaluate import count_flops
    from harness.engine.run import run_experiment
    from harness.engine.teacher import checkpoint_payload
    from harness.tracking import Tracker

    monkeypatch.setattr(teacher_module, "_CACHE", {})  # this run builds the cache
    teacher_cfg = experiment(model={"name": "unet", "width": 4, "depth": 3})
    data = load_data(teacher_cfg.data)
    teacher = build_model(teacher_cfg.model, data.in_channels, data.num_classes)
    torch.save(checkpoint_payload(teacher, teacher_cfg, data), tmp_path / "teacher.pt")
    cfg = experiment(kd={"method": "response"}, teacher=str(tmp_path / "teacher.pt"))

    def prune(epoch, metrics):
        raise Stop

    tracker = Tracker(store)
    with pytest.raises(Stop):
        run_experiment(cfg, tracker, experiment="pruned", on_epoch=prune, stop_states={Stop: "pruned"})
    (record,) = [r for _, r in tracker.runs_frame(["pruned"]).iterrows()]
    assert record["tags.state"] == "pruned" and record["tags.teacher.outputs"] == "cached"
    expected = count_flops(teacher, data.train.images[:1]) * len(data.train)
    assert record["metrics.teacher_cache_flops"] == expected > 0


# --- item 10: the device tag names the hardware; the timing tag says what ms/image timed --------------------


def test_device_tag_does_not_carry_the_training_threads():
    from harness.tracking.provenance import provenance_tags

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = provenance_tags(torch.device("cpu"))
        torch.set_num_threads(2)
        two = provenance_tags(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert one["device"] == two["device"] and "thread" not in one["device"]
    assert (one["train_threads"], two["train_threads"]) == ("1", "2")


def test_timing_tag_names_device_threads_input_dtype_and_memory_format():
    from harness.engine.evaluate import timing_tag
    from harness.models.unet import UNet
    from harness.tracking.provenance import device_name

    model, x = UNet(1, 3, width=2, depth=2), torch.randn(4, 1, 16, 16)
    cpu = device_name(torch.device("cpu"))
    assert timing_tag(model, x) == f"{cpu}; 1 thread; input 1x16x16, batch 1; float32; contiguous"
    assert timing_tag(model, x, threads=2).startswith(f"{cpu}; 2 threads;")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert "; bfloat16 autocast;" in timing_tag(model, x, autocast=bf16)
    assert timing_tag(model.to(memory_format=torch.channels_last), x).endswith("; channels_last")


def test_latency_key_tells_input_memory_formats_apart():
    from harness.engine.evaluate import architecture_key
    from harness.models.unet import UNet

    model, x = UNet(3, 3, width=2, depth=2), torch.randn(1, 3, 16, 16)
    ctx = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    last = x.to(memory_format=torch.channels_last)
    assert architecture_key(model, x, ctx, 1) != architecture_key(model, last, ctx, 1)
    assert architecture_key(model, x, ctx, 1) == architecture_key(model, x.clone(), ctx, 1)


# --- the teacher is looked up in `teachers` first; the student run records where it was found ------------


def finished_run(tracker, experiment: str, config_hash: str) -> str:
    run = tracker.start_run(experiment, "r", tags={"config_hash": config_hash, "role": "seed"})
    run.end("finished")
    return run.id


def test_teacher_is_looked_up_in_teachers_first(store, tiny_teacher):
    import time

    from harness.engine.teacher import find_teacher_run, teacher_config
    from harness.tracking import Tracker

    tracker = Tracker(store)
    config_hash = teacher_config(str(tiny_teacher)).hash()
    in_teachers = finished_run(tracker, "teachers", config_hash)
    time.sleep(0.01)
    finished_run(tracker, "width_search", config_hash)  # a later seed run with the same weights
    assert find_teacher_run(str(tiny_teacher), tracker) == in_teachers


def test_kd_run_records_teacher_lookup_timing_and_trivial_score(store, tiny_experiment):
    import pandas as pd

    from harness.cli import main
    from harness.tracking import Tracker

    assert main(["train", "--config", str(tiny_experiment), "--set", "kd.method=response", "--quiet"]) == 0
    frame = Tracker(store).runs_frame(["teachers", "tiny_student"]).set_index("experiment")
    teacher, student = frame.loc["teachers"], frame.loc["tiny_student"]
    assert student["tags.teacher.found_in"] == f"teachers/{teacher['run_id']}"
    assert student["tags.timing"].endswith("; 1 thread; input 1x32x32, batch 1; float32; contiguous")
    # the majority class of digit canvases is the background: IoU = its share of the labelled test pixels,
    # averaged over the classes the test split holds
    y = load_data(experiment().data).test.targets
    y = y[y != 255]
    expected = (y == 0).float().mean().item() / len(torch.unique(y))
    assert student["metrics.trivial/test_miou"] == pytest.approx(expected)
    for run in (teacher, student):
        assert run["tags.host"] and int(run["tags.pid"]) > 0
    assert float(teacher["tags.heartbeat"]) > 0 and pd.isna(student.get("tags.heartbeat"))


# --- item 15: a teacher run whose process died is closed as KILLED and the teacher trained again ----------

SLOW_TEACHER = """
import sys, time
import harness.engine.fit as fit
validate = fit.validate
fit.validate = lambda *a, **k: (time.sleep(5), validate(*a, **k))[1]  # time to be killed mid-training
from harness.engine.teacher import find_or_train_teacher
from harness.tracking import Tracker
find_or_train_teacher(sys.argv[1], Tracker(), quiet=True)
"""


def wait_for_epoch(client, timeout: float = 120.0):
    """The teachers' RUNNING run once it has logged an epoch."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name("teachers")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
        if runs and "train/loss" in runs[0].data.metrics:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("the teacher subprocess logged no epoch in time")


def test_teacher_killed_mid_training_is_closed_and_trained_again(store, tiny_teacher, capsys):
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from harness.engine.teacher import find_or_train_teacher
    from harness.tracking import Tracker

    proc = subprocess.Popen([sys.executable, "-c", SLOW_TEACHER, str(tiny_teacher)])
    try:
        client = MlflowClient(store)
        dead = wait_for_epoch(client)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"
    run_id, experiment_name = find_or_train_teacher(str(tiny_teacher), Tracker(store))
    closed = client.get_run(dead.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["state"] == "abandoned"
    assert f"process {closed.data.tags['host']}:{proc.pid} is gone" in closed.data.tags["failure"]
    assert experiment_name == "teachers" and client.get_run(run_id).data.tags["state"] == "finished"
    said = " ".join(capsys.readouterr().err.split())  # as one line, however the console wrapped it
    assert said.count("Training teacher") == 1
    assert f"again (run {dead.info.run_id} died with its process: closed as KILLED)" in said


def test_a_teacher_run_on_another_host_is_dead_only_without_a_recent_heartbeat():
    import time

    from harness.engine.teacher import dead_because

    now = time.time()
    fresh = {"tags.host": "elsewhere", "tags.pid": "1", "tags.heartbeat": f"{now - 30:.0f}"}
    assert dead_because(fresh, now) is None
    stale = {**fresh, "tags.heartbeat": f"{now - 300:.0f}"}
    assert dead_because(stale, now) == "no heartbeat from elsewhere:1 for 300 s"
    old = {"start_time": (now - 3600) * 1000}  # from before host, pid and heartbeat tags
    assert dead_because(old, now) == "no heartbeat from its process:? for 3600 s"
