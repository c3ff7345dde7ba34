"""Training through the real trainer and MLflow store: what one `train` run records, KD weights over
epochs, divergence, the teacher cache, and bad input."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import build_experiment
from harness.distill.response import ResponseConfig
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml


def only_run(store, experiment):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_train_command_logs_a_complete_run(tmp_path, store, tiny_teacher):
    assert main(["train", "--config", str(tiny_teacher), "--set", "train.epochs=3", "--quiet"]) == 0
    client, run = only_run(store, "tiny_teacher")
    m, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and tags["state"] == "finished"
    assert params["model.width"] == "4" and params["train.epochs"] == "3" and params["seed"] == "0"
    for key in ("val/loss", "test/loss", "params", "flops", "ms_per_image", "train_images_per_s"):
        assert m[key] > 0, key
    for key in ("val/miou", "test/miou", "val/pixel_acc", "test/pixel_acc"):
        assert 0 <= m[key] <= 1, key
    assert m["params"] == sum(p.numel() for p in _unet(4).parameters())
    assert "test/iou_0" in m and "test/iou_10" in m  # per-class IoU
    assert [x.step for x in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]
    # per-epoch validation, then the selected (best-validation) epoch's value one step after the last epoch
    val = {x.step: x.value for x in client.get_metric_history(run.info.run_id, "val/miou")}
    assert sorted(val) == [0, 1, 2, 3] and val[3] == val[int(m["best_epoch"])] == max(
        val[e] for e in range(3)
    )
    for key in ("git_commit", "device", "version.torch", "version.mlflow", "config_hash"):
        assert tags[key], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model.pt", "predictions.png"} <= artifacts
    png = client.download_artifacts(run.info.run_id, "predictions.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _unet(width):
    from harness.models.unet import UNet

    return UNet(1, 11, width=width, depth=3)


def test_kd_run_trains_the_teacher_once_and_logs_each_term(store, tiny_experiment):
    args = [
        "train",
        "--config",
        str(tiny_experiment),
        "--set",
        "kd.method=response",
        "--set",
        "kd.temperature=2",
        "--quiet",
    ]
    assert main(args) == 0
    assert main(args) == 0
    client = MlflowClient(store)
    teachers = client.search_runs([client.get_experiment_by_name("teachers").experiment_id])
    assert len(teachers) == 1  # found again by config hash the second time
    runs = client.search_runs([client.get_experiment_by_name("tiny_student").experiment_id])
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "train/kd")) == 2
        assert len(client.get_metric_history(run.info.run_id, "train/ce")) == 2
        assert run.data.tags["teacher.outputs"].startswith("cached")


def test_divergence_is_recorded_not_raised(store, tiny_teacher, capsys):
    assert main(["train", "--config", str(tiny_teacher), "--set", "train.lr=1e30", "--quiet"]) == 1
    _, run = only_run(store, "tiny_teacher")
    assert run.info.status == "FAILED" and run.data.tags["state"] == "diverged"
    assert run.data.tags["failure"] == "diverged: training loss not finite at epoch 0"
    assert "diverged" in capsys.readouterr().err


def test_regimes_and_schedule_set_the_weights_per_epoch():
    sequential = ResponseConfig(alpha=0.5, beta=2.0, regime="sequential", soft_epochs=2)
    assert [sequential.weights(e) for e in range(3)] == [(0.0, 2.0), (0.0, 2.0), (0.5, 0.0)]
    assert ResponseConfig(regime="soft").weights(0) == (0.0, 1.0)
    assert ResponseConfig(regime="hard", alpha=2).weights(5) == (2.0, 0.0)
    scheduled = ResponseConfig(alpha=5.0, beta=5e-5, schedule=[{"epoch": 25, "alpha": 1.0}])  # seed 000
    assert scheduled.weights(24) == (5.0, 5e-5) and scheduled.weights(25) == (1.0, 5e-5)


def test_cached_teacher_outputs_match_the_live_teacher():
    from harness.data import load_data
    from harness.engine.teacher import CachedTeacher, LiveTeacher

    cfg = build_experiment(
        {"name": "c", "data": TINY_DATA, "model": {"name": "unet", "width": 2, "depth": 3}}, "t"
    )
    data = load_data(cfg.data)
    teacher = _unet(4).eval()
    live = LiveTeacher(teacher, ["bottleneck"], lambda: torch.autocast("cpu", enabled=False))
    cached = CachedTeacher(live, data.train, torch.device("cpu"), batch_size=7)
    idx = torch.tensor([5, 0, 47])
    x = data.train.images[idx]
    (l1, f1), (l2, f2) = live(x, idx), cached(x, idx)
    # fp32 on the CPU, as the live teacher computes: equal up to batch-size-dependent rounding (1e-5)
    assert cached.store["__logits__"].dtype == torch.float32
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f2["bottleneck"], f1["bottleneck"], atol=1e-5, rtol=1e-5)
    # soft targets at a low temperature magnify any rounding of the logits (bf16 moved them by 0.04)
    soft = [torch.softmax(logits / 0.1, dim=1) for logits in (l1, l2)]
    torch.testing.assert_close(soft[1], soft[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "folder", "root": "/nonexistent/ds", "num_classes": 2}, "/nonexistent/ds"),
        ({"source": "voc", "root": "/nonexistent/voc"}, "VOCdevkit/VOC2012"),
        ({"source": "fashion_mnist", "root": "/nonexistent/fm"}, "FashionMNIST/raw"),
    ],
)
def test_missing_dataset_is_one_line_and_nothing_is_logged(tmp_path, store, data, message, capsys):
    path = write_yaml(
        tmp_path / "exp.yaml",
        {"name": "bad", "data": data, "model": {"name": "unet", "width": 2, "depth": 3}, "train": TINY_TRAIN},
    )
    code = main(["train", "--config", str(path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.startswith("error: ") and message in err and "\n" not in err
    assert MlflowClient(store).get_experiment_by_name("bad") is None


def test_bad_mask_value_in_a_worker_is_still_one_line(tmp_path, store, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(np.full((16, 16), 7 if i == 3 else i % 2, dtype=np.uint8)).save(
            root / "masks" / f"s{i}.png"
        )
    path = write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "folder",
            "data": {
                "source": "folder",
                "root": str(root),
                "num_classes": 2,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
            },
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": {**TINY_TRAIN, "batch_size": 2},
        },
    )
    code = main(["train", "--config", str(path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "s3.png" in err and "\n" not in err and "Traceback" not in err, err


def test_eval_batch_size_sets_the_validation_and_test_batches(store, tiny_teacher, monkeypatch):
    from harness.engine import fit as fit_module
    from harness.engine import run as run_module

    sizes = []
    for module in (fit_module, run_module):
        real = module.evaluate

        def recorded(*args, _real=real, **kw):
            sizes.append(kw["batch_size"])
            return _real(*args, **kw)

        monkeypatch.setattr(module, "evaluate", recorded)
    args = ["train", "--config", str(tiny_teacher), "--set", "train.eval_batch_size=5", "--quiet"]
    assert main(args) == 0
    assert sizes and set(sizes) == {5}  # every epoch's validation and the test split
    cfg = build_experiment(
        {"name": "x", "data": TINY_DATA, "model": {"name": "unet"}, "train": TINY_TRAIN}, "x"
    )
    assert "eval_batch_size" not in cfg.model_dump()["train"]  # unset: configs hash as before
