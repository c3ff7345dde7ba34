"""Bring your own model: an smp teacher saved with torch.save(state_dict) used as it is (train.epochs 0),
students distilled from it (a feature method on default taps, and CWD), and the one-line errors for weights
that do not fit or are not cached and for a student whose input normalisation differs from its teacher's.
Also data.normalize on every kind of split and the experiment-kind tag. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchmetrics.classification import MulticlassJaccardIndex

from harness.cli import main
from harness.config import load_experiment
from harness.data import load_data
from harness.errors import DataError
from harness.models import build_model
from tests.conftest import TINY_DATA, write_yaml

# Small smp models: resnet18 encoders cut to 3 stages (32x32 inputs need a stride dividing 32).
TEACHER_MODEL = {"name": "smp", "arch": "Unet", "encoder": "resnet18", "encoder_depth": 3}
STUDENT_MODEL = {
    "name": "smp",
    "arch": "Unet",
    "encoder": "resnet18",
    "encoder_depth": 2,
    "options": {"decoder_channels": [16, 8]},
}
ONE_EPOCH = {"epochs": 1, "batch_size": 16, "lr": 0.01, "seed": 0}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HARNESS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def runs_in(store: str) -> list:
    if not Path(store.removeprefix("sqlite:///")).exists():
        return []  # the store was never opened
    client = MlflowClient(store)
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids)) if ids else []


def train(path, capsys) -> tuple[int, str]:
    code = main(["train", "--config", str(path), "--quiet"])
    return code, capsys.readouterr().err.strip()


def saved_teacher(tmp_path):
    """An smp teacher's weights as a user would save them, and the experiment that uses them as they are."""
    torch.manual_seed(0)
    model = build_model(load_experiment_model(TEACHER_MODEL), 1, 11)
    weights = tmp_path / "teacher_weights.pt"
    torch.save(model.state_dict(), weights)
    exp = write_yaml(
        tmp_path / "experiments" / "smp_teacher.yaml",
        {
            "name": "smp_teacher",
            "data": TINY_DATA,
            "model": {**TEACHER_MODEL, "weights": str(weights)},
            "train": {"epochs": 0, "batch_size": 16},
        },
    )
    return model, weights, exp


def load_experiment_model(cfg: dict):
    from harness.models import MODELS

    return MODELS.config_class(cfg["name"])(**cfg)


def independent_miou(model, split) -> float:
    metric = MulticlassJaccardIndex(num_classes=11, average="macro", ignore_index=255)
    with torch.no_grad():
        metric.update(model.eval()(split.images).argmax(1), split.targets)
    return metric.compute().item()


def student(tmp_path, name: str, teacher, kd: dict, model=STUDENT_MODEL, data=TINY_DATA):
    return write_yaml(
        tmp_path / "experiments" / f"{name}.yaml",
        {"name": name, "data": data, "model": model, "train": ONE_EPOCH, "kd": kd, "teacher": str(teacher)},
    )


def untrained_teacher(tmp_path):
    return write_yaml(
        tmp_path / "t.yaml",
        {"name": "t", "data": TINY_DATA, "model": {"name": "unet", "width": 2, "depth": 3}},
    )


def test_saved_smp_teacher_is_used_as_it_is_and_distilled(tmp_path, store, capsys):
    model, weights, teacher_exp = saved_teacher(tmp_path)
    assert train(teacher_exp, capsys)[0] == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("smp_teacher").experiment_id])
    m = run.data.metrics
    data = load_data(load_experiment(teacher_exp).data)
    assert m["val/miou"] == pytest.approx(independent_miou(model, data.val), abs=1e-6)
    assert m["test/miou"] == pytest.approx(independent_miou(model, data.test), abs=1e-6)
    assert m["best_epoch"] == -1 and m["epochs_run"] == 0 and "train/loss_final" not in m
    assert m["params"] > 0 and m["flops"] > 0 and m["ms_per_image"] > 0
    assert {"config.yaml", "model.pt", "predictions.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }

    weights.unlink()  # the teacher's checkpoint holds its weights: the file is not read again
    for name, kd in (("fitnet_student", {"method": "fitnet"}), ("cwd_student", {"method": "cwd"})):
        assert train(student(tmp_path, name, teacher_exp, kd), capsys)[0] == 0
        (srun,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert srun.data.tags["state"] == "finished"
        assert srun.data.tags["teacher.source"] == f"run {run.info.run_id} ({teacher_exp})"
        assert srun.data.metrics["train/hint" if name == "fitnet_student" else "train/cwd"] > 0
    assert client.get_experiment_by_name("teachers") is None  # the teacher was found, not trained again


def test_renamed_key_is_one_line_exit_2_and_nothing_is_logged(tmp_path, store, capsys):
    """The student is built (with its weights) before its teacher is looked up or trained."""
    state = build_model(load_experiment_model(STUDENT_MODEL), 1, 11).state_dict()
    state["net.encoder.conv1.weights"] = state.pop("net.encoder.conv1.weight")
    bad = tmp_path / "renamed.pt"
    torch.save(state, bad)
    model = {**STUDENT_MODEL, "weights": str(bad)}
    exp = student(tmp_path, "renamed", untrained_teacher(tmp_path), {"method": "fitnet"}, model=model)
    code, err = train(exp, capsys)
    assert code == 2 and err.startswith("error: model.weights") and "\n" not in err
    assert "1 missing key(s) (first: net.encoder.conv1.weight)" in err
    assert "1 unexpected key(s) (first: net.encoder.conv1.weights)" in err
    assert runs_in(store) == []


def test_uncached_torchvision_weights_name_is_one_line(tmp_path, store, capsys):
    exp = write_yaml(
        tmp_path / "tv.yaml",
        {
            "name": "tv",
            "data": TINY_DATA,
            "model": {"name": "deeplabv3_mobilenet_v3_large", "weights": "DEFAULT"},
            "train": {"epochs": 0},
        },
    )
    code, err = train(exp, capsys)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert code == 1 and "\n" not in err
    assert f"deeplabv3_mobilenet_v3_large-fc3c493d.pth is not in {folder}" in err
    assert runs_in(store) == []


def test_student_normalised_unlike_its_teacher_is_one_line(tmp_path, store, capsys):
    data = {**TINY_DATA, "normalize": {"mean": [0.1], "std": [0.3]}}
    exp = student(tmp_path, "normed", untrained_teacher(tmp_path), {"method": "response"}, data=data)
    code, err = train(exp, capsys)
    assert code == 1 and "\n" not in err
    assert "input normalisation none but this run's data has mean [0.1] std [0.3]" in err
    assert runs_in(store) == []  # checked before the teacher is trained


# ---------------------------------------------------------------- data.normalize


def test_normalize_applies_once_to_in_memory_splits_and_stays_out_of_unset_dumps():
    from harness.data.digits_seg import DigitsSegConfig

    plain = load_data(DigitsSegConfig(**TINY_DATA))
    cfg = DigitsSegConfig(**TINY_DATA, normalize={"mean": [0.2], "std": [0.5]})
    normed = load_data(cfg)
    torch.testing.assert_close(normed.val.images, (plain.val.images - 0.2) / 0.5)
    assert torch.equal(normed.val.targets, plain.val.targets)
    assert "normalize" not in DigitsSegConfig(**TINY_DATA).model_dump()  # config hashes unchanged
    assert cfg.model_dump()["normalize"] == {"mean": [0.2], "std": [0.5]}
    with pytest.raises(DataError, match="gives 3 mean/std values but the data has 1 input channel"):
        load_data(DigitsSegConfig(**TINY_DATA, normalize={"mean": [0.5] * 3, "std": [0.5] * 3}))


def test_normalize_applies_to_folder_samples(tmp_path):
    from harness.data.folder import FolderConfig
    from tests.test_data_sources import make_folder

    make_folder(tmp_path / "ds", n=10)
    base = {"root": str(tmp_path / "ds"), "num_classes": 3}
    plain = load_data(FolderConfig(**base))
    normed = load_data(FolderConfig(**base, normalize={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.5]}))
    x, y = plain.test[0]
    nx, ny = normed.test[0]
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(nx, (x - mean) / std)
    assert torch.equal(ny, y) and normed.train.deterministic
    with pytest.raises(ValueError, match="not both"):
        FolderConfig(**base, normalize={"mean": [0.5] * 3, "std": [0.5] * 3}, augment={"normalize": True})


def test_imagenet_augment_normalize_reads_as_the_same_statistics_given_explicitly():
    from harness.data.normalize import describe_normalization
    from harness.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    explicit = {"normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    assert describe_normalization({"augment": {"normalize": True}}, 3) == describe_normalization(explicit, 3)
    assert describe_normalization({"normalize": False}, 1) == describe_normalization({}, 1) == "none"


# ---------------------------------------------------------------- MLflow UI


def test_experiments_are_tagged_as_model_training(tmp_path):
    from harness.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, client = Tracker(uri), MlflowClient(uri)
    client.create_experiment("older")  # made before the harness set the tag
    client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("fresh", "older", "chosen"):
        tags = client.get_experiment(tracker.experiment_id(name)).tags
        expected = "genai_development" if name == "chosen" else "custom_model_development"
        assert tags["mlflow.experimentKind"] == expected, name


def test_shipped_voc_example_files_validate():
    """The README's VOC example (it cannot run here: no VOC data, no pretrained weights)."""
    from harness.sweep.config import load_study

    teacher = load_experiment("experiments/voc/deeplabv3_resnet50.yaml")
    student_cfg = load_experiment("experiments/voc/unet_mobilenet_v2.yaml")
    assert teacher.train.epochs == 0 and teacher.model.weights == "DEFAULT"
    assert student_cfg.data.normalize == teacher.data.normalize
    assert load_study("studies/voc_deeplab_to_unet.yaml").teacher == "experiments/voc/deeplabv3_resnet50.yaml"
