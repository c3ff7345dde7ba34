"""``python -m harness export`` (issue 29): a real tiny study (k-UNet) and two `train` runs (seed 000's
student, an smp Unet) exported to ONNX, onnxruntime's logits checked against PyTorch's by the test itself,
the registered versions and their tags, a second export as version 2, the README snippet run, the report's
table; bad input refused with one line, exit 2 and nothing registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from mlflow.artifacts import download_artifacts

from harness.cli import main
from harness.config import build_experiment
from harness.data import load_data
from harness.export.package import snippet_of
from harness.models import build_model
from harness.report.build import analyse
from harness.tracking import Tracker
from harness.tracking.registry import model_versions
from tests.conftest import write_yaml

pytestmark = pytest.mark.slow

DATA = {"source": "digits_seg", "image_size": 32, "train": 32, "val": 16, "test": 16, "seed": 0}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 0.01, "seed": 0}


def experiment(path, name: str, model: dict, **train) -> str:
    return str(write_yaml(path, {"name": name, "data": DATA, "model": model, "train": {**TRAIN, **train}}))


def sweep(tmp, uri: str, name: str, fixed: dict, search: dict, seeds: list[int]) -> None:
    exp = experiment(tmp / f"{name}.yaml", name, {"name": "unet", "width": 2, "depth": 2})
    study = {
        "experiment": exp,
        "budget": {"trials": 2},
        "sampler": {"name": "grid", "seed": 0},
        "seeds": seeds,
        "fixed": fixed,
        "search": search,
    }
    path = write_yaml(tmp / "studies" / f"{name}.yaml", study)
    main(
        [
            "sweep",
            "--study",
            str(path),
            "--storage",
            str(tmp / f"{name}-journal.log"),
            "--tracking-uri",
            uri,
            "--quiet",
        ]
    )


@pytest.fixture(scope="module")
def kunet(tmp_path_factory):
    """A two-configuration, three-seed k-UNet study in a fresh store."""
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    sweep(tmp, uri, "ship", {"train.epochs": 2}, {"train.lr": {"choices": [0.05, 1e-6]}}, [0, 1, 2])
    return tmp, uri


def export(uri: str, out, *args) -> int:
    return main(["export", *args, "--out", str(out), "--tracking-uri", uri, "--val-images", "16"])


def onnx_matches_pytorch(folder) -> float:
    """The package's ONNX model against its own state dict and config, on the run's validation images
    (at the training size and at a larger one): the largest absolute logit difference."""
    cfg = build_experiment(yaml.safe_load((folder / "config.yaml").read_text()), "package")
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.in_channels, data.num_classes, load_weights=False)
    model.load_state_dict(torch.load(folder / "state_dict.pt", weights_only=True))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in (data.val.images, torch.nn.functional.interpolate(data.val.images[:3], size=(64, 96))):
        with torch.no_grad():
            ref = model.eval()(x).numpy()
        out = session.run(None, {"input": x.numpy()})[0]
        assert out.shape == ref.shape
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def test_study_export_registers_a_tagged_version_and_a_second_one(kunet, capsys):
    tmp, uri = kunet
    tracker = Tracker(uri)
    runs = tracker.runs_frame(["ship"])
    seeds = runs[runs["tags.role"] == "seed"]
    trials = runs[runs["tags.role"] == "trial"]
    best = trials.loc[trials["metrics.val/miou"].idxmax()]  # the validation objective chooses
    mine = seeds[seeds["tags.mlflow.parentRunId"] == best["run_id"]]
    val = mine["metrics.val/miou"]
    nearest = mine.loc[(val - val.mean()).abs().idxmin()]
    capsys.readouterr()

    assert export(uri, tmp / "pkg", "--study", "ship") == 0
    printed = capsys.readouterr().out
    assert "max |logit difference|" in printed and "val miou PyTorch" in printed and "onnxruntime" in printed
    folder = tmp / "pkg"
    meta = json.loads((folder / "package.json").read_text())
    assert meta["opset"] == 18 and meta["input"]["shape"][0] == "batch" and meta["ignore_index"] == 255
    assert meta["input"]["dynamic"] == ["batch", "height (multiple of 2)", "width (multiple of 2)"]
    assert meta["class_names"][0] == "background" and len(meta["class_names"]) == 11
    assert meta["normalization"]["mean"] is None and meta["verify"]["max_abs_diff"] <= 1e-3
    assert onnx_matches_pytorch(folder) < 1e-4

    (v1,) = model_versions(tracker, "ship")
    tags = v1["tags"]
    test_miou = mine["metrics.test/miou"]
    assert tags["study"] == "ship" and tags["trial"] == best["tags.optuna.trial"]
    assert tags["seeds"] == "0,1,2" and tags["seed"] == nearest["tags.seed"]
    assert tags["source_run"] == nearest["run_id"]
    assert tags["test/miou"] == f"{test_miou.mean():.4f} ± {test_miou.std():.4f} (n=3)"
    assert int(tags["params"]) == int(nearest["metrics.params"]) and tags["teacher"] == "none"
    assert float(tags["ms_per_image.onnxruntime"]) > 0 and float(tags["ms_per_image.pytorch"]) > 0
    assert "1 thread" in tags["timing"] and "median of 50" in tags["timing"]
    parent = tracker.run_record(runs.loc[runs["tags.role"] == "study", "run_id"].iloc[0])
    assert parent["tags.export.model"] == "models:/ship/1"
    export_run = tracker.run_record(v1["run_id"])
    assert export_run["tags.role"] == "export" and export_run["tags.mlflow.parentRunId"] == parent["run_id"]

    namespace: dict = {}  # the README's predict snippet, as a user runs it
    exec(compile(snippet_of((folder / "README.md").read_text()), "README", "exec"), namespace)
    assert "prediction (32, 32) accuracy" in capsys.readouterr().out
    assert namespace["labels"].shape == (32, 32)

    assert export(uri, tmp / "pkg2", "--study", "ship", "--seed", "2") == 0
    v1_again, v2 = model_versions(tracker, "ship")
    assert (v1_again["version"], v2["version"]) == (1, 2) and v2["source"] != v1["source"]
    assert v2["tags"]["seed"] == "2" and v1_again["tags"] == tags  # version 1 kept as it was
    assert tracker.run_record(parent["run_id"])["tags.export.model"] == "models:/ship/2"
    first = Path(download_artifacts("models:/ship/1", dst_path=str(tmp / "v1"), tracking_uri=uri))
    session = ort.InferenceSession(str(first / "model.onnx"), providers=["CPUExecutionProvider"])
    image = np.load(first / "extra_files" / "example.npy")[None]  # version 1's own files, still whole
    assert session.run(None, {"input": image})[0].shape == (1, 11, 32, 32)

    table = analyse(tracker, "ship").table("exported")
    assert table.frame["model version"].iloc[0] == "models:/ship/2"
    assert table.frame["onnxruntime ms/image"].iloc[0] == pytest.approx(
        float(v2["tags"]["ms_per_image.onnxruntime"])
    )


@pytest.mark.parametrize(
    "model",
    [
        {"name": "dilated_br", "width": 4},
        {"name": "smp", "arch": "Unet", "encoder": "resnet18", "encoder_depth": 3},
    ],
    ids=["seed000_student", "smp_unet"],
)
def test_train_runs_export(tmp_path, store, model):
    cfg = experiment(tmp_path / "exp.yaml", f"lone_{model['name']}", model)
    assert main(["train", "--config", cfg, "--quiet"]) == 0
    (run_id,) = Tracker(store).runs_frame([f"lone_{model['name']}"])["run_id"]
    assert export(store, tmp_path / "pkg", "--run", run_id) == 0
    assert onnx_matches_pytorch(tmp_path / "pkg") < 1e-3
    (version,) = model_versions(Tracker(store), f"lone_{model['name']}")
    assert version["tags"]["source_run"] == run_id and version["tags"]["seeds"] == "0"
    dynamic = json.loads((tmp_path / "pkg" / "package.json").read_text())["input"]["dynamic"]
    assert dynamic == ["batch", "height", "width"]  # both take any size


def one_line_exit_2(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err


def test_bad_input_is_refused_and_registers_nothing(kunet, tmp_path, capsys, monkeypatch):
    tmp, uri = kunet
    tracker = Tracker(uri)
    before = model_versions(tracker, "ship")
    one_line_exit_2(capsys, export(uri, tmp_path / "a", "--study", "nosuch"), "study nosuch", "ship")
    one_line_exit_2(capsys, export(uri, tmp_path / "b", "--run", "0" * 32), "unknown run")
    one_line_exit_2(capsys, export(uri, tmp_path / "c", "--study", "ship", "--seed", "7"), "seed 7")

    sweep(tmp, uri, "blowup", {"train.lr": 1e30}, {"train.batch_size": {"choices": [8, 16]}}, [0])
    capsys.readouterr()  # the sweep's summary
    one_line_exit_2(capsys, export(uri, tmp_path / "d", "--study", "blowup"), "no finished configuration")

    import harness.export.steps as steps

    load = steps._checkpoint

    class Eig(torch.nn.Module):  # a model with an operator ONNX has no function for
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + torch.linalg.eigvals(x[:, :, :2, :2]).real.mean()

    monkeypatch.setattr(steps, "_checkpoint", lambda *a: (Eig(load(*a)[0]), load(*a)[1]))
    one_line_exit_2(capsys, export(uri, tmp_path / "e", "--study", "ship"), "operator aten.linalg_eig")
    monkeypatch.setattr(steps, "_checkpoint", load)
    monkeypatch.setattr("harness.export.verify.LOGIT_TOLERANCE", -1.0)  # any difference at all is too much
    one_line_exit_2(capsys, export(uri, tmp_path / "f", "--study", "ship"), "differs from PyTorch")
    assert model_versions(tracker, "ship") == before and model_versions(tracker, "blowup") == []
