"""One run on several processes (issue 27), on the CPU with gloo and 2 processes.

* equivalence: 2 forked processes (file store) train a tiny batch-norm-free k-UNet to the same weights as
  one process at the same global batch and seed, for kd.method none (also with train.grad_accum 2),
  response and feature_cosine (its 1x1 adapter trains under DDP too); the sharded, all-reduced
  test mIoU equals the one-process value exactly; a decision rank 0 takes is followed by rank 1;
* a study with ``worker --gpus-per-trial 2``: each seed is a torchrun group; a rank killed with SIGKILL
  fails its trial once (its seed run FAILED with the killed rank named in traceback.txt) and the study
  goes on; the other trial's seeds finish, one run per seed, logged once (rank 0), tagged 2 processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import build_experiment
from harness.data.base import DataSplits, TensorSplit
from harness.engine import distributed
from harness.engine.evaluate import evaluate
from harness.engine.fit import fit
from harness.engine.run import build_distiller, seed_everything
from harness.engine.teacher import LiveTeacher, freeze
from harness.errors import ConfigError
from harness.models import build_model
from tests.conftest import TINY_DATA, write_yaml

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
CASES = {  # name: (kd block, train overrides)
    "none": ({"method": "none"}, {}),
    "none_accum": ({"method": "none"}, {"grad_accum": 2}),
    "response": ({"method": "response", "temperature": 2.0, "alpha": 0.5}, {}),
    "feature_cosine": ({"method": "feature_cosine"}, {}),
}


def tiny_data() -> DataSplits:
    """Synthetic 3-class 16x16 segmentation with no ignored pixel (the per-process CE means then average
    to the one-process mean exactly); 13 test images so the ranks' test shares differ in size."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.rand(n, 1, 16, 16, generator=g)
        return TensorSplit(x, (x[:, 0] * 3).long().clamp(max=2))

    return DataSplits("segmentation", split(32), split(12), split(13), num_classes=3, in_channels=1)


def config(kd: dict, train: dict):
    tree = {
        "name": "ddp",
        "data": TINY_DATA,
        "model": {"name": "unet", "width": 2, "depth": 2, "batch_norm": False},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "seed": 3, "select_on": "val/loss", **train},
        "kd": kd,
    }
    if kd["method"] != "none":
        tree["teacher"] = "teacher.pt"  # the test serves a teacher itself
    return build_experiment(tree, "test")


def train_case(name: str, data: DataSplits) -> dict[str, torch.Tensor]:
    cfg = config(*CASES[name])
    seed_everything(0)
    teacher = None
    if cfg.kd.method != "none":  # wider than the student: feature_cosine gets a trainable adapter
        teacher = freeze(build_model(cfg.model.model_copy(update={"width": 4}), 1, 3))
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, 1, 3)
    distiller = build_distiller(cfg, model, teacher, data, CPU)
    server = None
    if teacher is not None:
        server = LiveTeacher(teacher, distiller.teacher_layers, lambda: torch.autocast("cpu", enabled=False))
    fit(model, data, cfg, device=CPU, distiller=distiller, teacher=server)
    return {**model.state_dict(), **{f"kd.{k}": v for k, v in distiller.state_dict().items()}}


def sharded_eval(model, data: DataSplits, shard: bool) -> dict[str, float]:
    return evaluate(
        model,
        data.test,
        task="segmentation",
        num_classes=3,
        ignore_index=255,
        device=CPU,
        batch_size=4,
        shard=shard,
    )


def rank_main(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    data = tiny_data()
    weights = {name: train_case(name, data) for name in CASES}
    seed_everything(1)
    model = build_model(config({"method": "none"}, {}).model, 1, 3)
    decided = None
    try:
        distributed.on_main(distributed.current(), lambda: (_ for _ in ()).throw(ValueError("stop here")))
    except (ValueError, distributed.Stopped) as exc:
        decided = f"{type(exc).__name__}: {exc}"
    torch.save(
        {
            "weights": weights,
            "sharded": sharded_eval(model, data, shard=True),
            "whole": sharded_eval(model, data, shard=False),
            "decided": decided,
        },
        f"{out}/rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results (one fork of 2 processes for every case)."""
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, str(tmp / "store"), str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_reach_the_one_process_weights(two_ranks, name):
    alone = train_case(name, tiny_data())
    for rank in two_ranks:
        got = rank["weights"][name]
        assert got.keys() == alone.keys()
        for key, value in alone.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    # training moved the weights: the comparison is not between two untrained models
    seed_everything(config(*CASES[name]).train.seed)
    fresh = build_model(config(*CASES[name]).model, 1, 3).state_dict()
    assert max((alone[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-3
    if name == "none_accum":  # accumulating 2 micro-batches keeps the global batch's step
        for key, value in train_case("none", tiny_data()).items():
            torch.testing.assert_close(alone[key], value, rtol=1e-4, atol=1e-5)
    if name == "feature_cosine":  # its adapter trained under DDP as well
        assert any(k.startswith("kd.") for k in alone)


def test_sharded_miou_equals_one_process_exactly(two_ranks):
    alone = sharded_eval(build_model_seeded(), tiny_data(), shard=False)
    for rank in two_ranks:
        assert rank["sharded"]["miou"] == rank["whole"]["miou"] == alone["miou"]
        assert rank["sharded"]["pixel_acc"] == alone["pixel_acc"]
        assert {k: v for k, v in rank["sharded"].items() if k.startswith("iou_")} == {
            k: v for k, v in alone.items() if k.startswith("iou_")
        }
        assert rank["sharded"]["loss"] == pytest.approx(alone["loss"], rel=1e-6)


def build_model_seeded():
    seed_everything(1)
    return build_model(config({"method": "none"}, {}).model, 1, 3)


def test_rank_zero_decision_is_followed(two_ranks):
    assert two_ranks[0]["decided"] == "ValueError: stop here"
    assert two_ranks[1]["decided"] == "Stopped: ValueError: stop here"


def test_bad_layouts_are_one_line_errors():
    cfg = config({"method": "none"}, {"batch_size": 6, "grad_accum": 4})
    with pytest.raises(ConfigError, match="does not split into 1 process"):
        distributed.check(cfg.train, distributed.Dist(), CPU)
    with pytest.raises(ConfigError, match="SyncBatchNorm runs on GPUs only"):
        distributed.check(config({"method": "none"}, {"sync_bn": True}).train, distributed.Dist(0, 2), CPU)
    assert distributed.micro_batches(5, 2) == [slice(0, 3), slice(3, 5)]


def kill_rank_one(done: threading.Event, killed: list) -> None:
    """SIGKILL rank 1 of the first group once its rank 0 has finished an epoch (training is under way)."""
    me = psutil.Process()
    while not done.is_set() and not killed:
        for p in me.children(recursive=True):
            try:
                cmd = p.cmdline()
                if "harness.sweep.group" in cmd and p.environ().get("RANK") == "1":
                    if (Path(cmd[-1]) / "epoch0.json").exists():
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)


def test_study_with_two_processes_per_trial(tmp_path, store, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "g",
            "data": {**TINY_DATA, "image_size": 16, "train": 32, "val": 16, "test": 16},
            "model": {"name": "unet", "width": 2, "depth": 2},
            "train": {"epochs": 12, "batch_size": 8, "lr": 0.01, "seed": 0},  # room for the kill
        },
    )
    study = write_yaml(
        tmp_path / "ddp_study.yaml",
        {
            "experiment": str(exp),
            "budget": {"trials": 2},
            "sampler": {"name": "grid", "seed": 0},
            "seeds": [0, 1],
            "search": {"train.lr": {"choices": [0.01, 0.02]}},
        },
    )
    journal = str(tmp_path / "journal.log")
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_rank_one, args=(done, killed), daemon=True)
    watcher.start()
    try:
        code = main(
            ["worker", "--study", str(study), "--storage", journal, "--gpus-per-trial", "2", "--quiet"]
        )
    finally:
        done.set()
    assert killed, "no rank 1 was found to kill"
    assert code == 0
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    trials = optuna.load_study(study_name="ddp_study", storage=JournalStorage(JournalFileBackend(journal)))
    states = sorted(t.state.name for t in trials.get_trials())
    failures = [t.user_attrs.get("failure") for t in trials.get_trials()]
    assert states == ["COMPLETE", "FAIL"], failures  # the killed rank's trial failed once; the study went on
    failed = next(t for t in trials.get_trials() if t.state.name == "FAIL")
    assert "rank 1 of 2 processes" in failed.user_attrs["failure"]

    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("ddp_study").experiment_id
    seeds = client.search_runs([exp_id], "tags.role = 'seed'")
    by_trial: dict[str, list] = {}
    for run in seeds:
        by_trial.setdefault(run.data.tags["optuna.trial"], []).append(run)
    bad = by_trial[str(failed.number)]
    assert len(bad) == 1 and bad[0].info.status == "FAILED"
    trace = Path(client.download_artifacts(bad[0].info.run_id, "traceback.txt", str(tmp_path))).read_text()
    assert "rank 1 ended without a traceback" in trace and "-9" in trace
    (good,) = [runs for trial, runs in by_trial.items() if trial != str(failed.number)]
    assert sorted(r.data.tags["seed"] for r in good) == ["0", "1"]  # one run per seed, none twice
    for run in good:
        assert run.info.status == "FINISHED" and run.data.tags["distributed"] == "2 processes (gloo)"
        history = client.get_metric_history(run.info.run_id, "val/miou")
        assert sorted(m.step for m in history) == list(range(13))  # 12 epochs + the final, each once
    (parent,) = client.search_runs([exp_id], "tags.role = 'study'")
    assert parent.data.metrics["trials_failed"] == 1
    assert len(client.search_runs([exp_id], "tags.role = 'trial'")) == 2
    assert json.loads(json.dumps(failed.user_attrs["seed_states"])) == {"0": "failed"}


class Listed(torch.utils.data.Dataset):
    """A file-backed split's stand-in: samples one by one, through a DataLoader."""

    def __init__(self, split: TensorSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split[i]


@pytest.mark.parametrize("kind", ["tensor", "loader"])
def test_rank_shares_partition_the_one_process_batches(kind, monkeypatch):
    from harness.data import loader

    monkeypatch.setattr(loader.os, "cpu_count", lambda: 0)  # no worker processes in this test
    split = tiny_data().train if kind == "tensor" else Listed(tiny_data().train)

    def batches(shard):
        gen = torch.Generator().manual_seed(5)
        out = []
        for _ in range(2):  # two epochs: the order is reshuffled, from the same seeded generator
            it = loader.iterate_batches(split, 8, device=CPU, shuffle=True, generator=gen, shard=shard)
            out += [idx.tolist() for _, _, idx in it]
        return out

    alone, first, second = batches((0, 1)), batches((0, 2)), batches((1, 2))
    assert len(alone) == len(first) == len(second) == 8 and alone[0] != alone[4]
    for whole, a, b in zip(alone, first, second):
        assert len(a) == len(b) == 4 and sorted(a + b) == sorted(whole)


def test_worker_answers_rank_zeros_epochs_and_its_prune_stops_the_seed(tmp_path):
    """The worker side of a group's epochs (sweep/group.py): rank 0 hands each epoch over and waits; a
    pruned trial is answered with a stop that rank 0 raises (and broadcasts), the others go on."""
    from harness.sweep import group

    relay, asked, raised = group.EpochRelay(tmp_path), [], []

    def rank_zero():
        try:
            for epoch in range(3):
                relay(epoch, {"val/miou": 0.1 * epoch})
        except group.Decided as exc:
            raised.append(str(exc))

    thread = threading.Thread(target=rank_zero)

    class Proc:  # the group: running while rank 0 is
        def poll(self):
            return None if thread.is_alive() else 0

    def on_epoch(epoch, metrics):
        asked.append((epoch, metrics["val/miou"]))
        if epoch == 1:
            raise optuna.TrialPruned("pruned after epoch 1")

    thread.start()
    stopped = group.follow(Proc(), tmp_path, on_epoch, {optuna.TrialPruned: "pruned"})
    thread.join()
    assert asked == [(0, 0.0), (1, 0.1)]
    assert isinstance(stopped, optuna.TrialPruned) and raised == ["TrialPruned: pruned after epoch 1"]


LAUNCHER_LOG = """Failures:
[1]:
  time      : 2026-12-01_13:08:34
  rank      : {other} (local_rank: {other})
  exitcode  : -15 (pid: 12119)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_13:08:34
  rank      : {cause} (local_rank: {cause})
  exitcode  : {code} (pid: 12120)
"""


def test_the_rank_that_caused_a_group_failure_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.GROUP_DIR, str(tmp_path))
    try:
        raise ValueError("bad shard on rank 1")
    except ValueError:
        distributed.leave_failure(1)
    log = LAUNCHER_LOG.format(other=0, cause=1, code=1)
    rank, text = distributed.root_failure(tmp_path, log)
    assert rank == 1 and "ValueError: bad shard on rank 1" in text and "Traceback" in text
    # a rank killed by a signal leaves nothing: it is the cause even if another rank left a traceback
    killed = LAUNCHER_LOG.format(other=1, cause=0, code=-9)
    rank, text = distributed.root_failure(tmp_path, killed)
    assert rank == 0 and text.startswith("rank 0 ended without a traceback") and "-9" in text
