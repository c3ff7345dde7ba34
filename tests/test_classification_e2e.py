"""Seed 003's study in miniature, end to end: a grid over the combo presets (Triplet; Triplet + HKD;
Triplet + HKD + RKD-DA) on scikit-learn digits with tiny MLPs, through ``python -m harness sweep``,
Optuna (journal file) and MLflow (SQLite); then the report's classification table when the report exists."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import write_yaml

pytestmark = pytest.mark.slow

DATA = {"source": "digits", "image_size": 8, "seed": 0}
TRAIN = {"epochs": 2, "batch_size": 128, "lr": 0.01, "early_stopping": 5, "seed": 0}
PRESETS = ["triplet", "triplet+hkd", "triplet+hkd+rkd"]
TERMS = {
    "triplet": ["triplet/triplet"],
    "triplet+hkd": ["triplet/triplet", "response/kd"],
    "triplet+hkd+rkd": ["triplet/triplet", "response/kd", "rkd/rkd_distance", "rkd/rkd_angle"],
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The study run once for this module's tests: (MLflow store URI, study name)."""
    tmp_path = tmp_path_factory.mktemp("rkd_triplet")
    teacher = write_yaml(
        tmp_path / "experiments" / "teachers" / "mlp.yaml",
        {
            "name": "tiny_mlp_teacher",
            "data": DATA,
            "model": {"name": "mlp", "hidden": [32], "input_size": 8},
            "train": TRAIN,
        },
    )
    student = write_yaml(
        tmp_path / "experiments" / "student.yaml",
        {
            "name": "tiny_mlp_student",
            "data": DATA,
            "model": {"name": "mlp", "hidden": [16], "input_size": 8},
            "train": TRAIN,
            "teacher": str(teacher),
            # the kd block lives in the experiment, not in the study's `fixed`: sweep's ensure_teacher
            # validates the experiment with the fixed keys alone,
            # and `kd.method: combo` without a preset is incomplete
            "kd": {"method": "combo", "preset": "triplet"},
        },
    )
    study = write_yaml(
        tmp_path / "studies" / "rkd_triplet_tiny.yaml",
        {
            "experiment": str(student),
            "objective": {"metric": "val/accuracy", "direction": "maximize"},
            "budget": {"trials": 3},
            "sampler": {"name": "grid", "seed": 0},
            "seeds": [0, 1],
            "search": {"kd.preset": {"choices": PRESETS}},
        },
    )
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:  # nothing may reach the repository's mlruns/
        mp.setenv("MLFLOW_TRACKING_URI", store)
        args = ["--storage", str(tmp_path / "journal.log"), "--tracking-uri", store, "--quiet"]
        assert main(["sweep", "--study", str(study), *args]) == 0
    return store, "rkd_triplet_tiny"


def test_seed_003_presets_end_to_end(swept):
    store, name = swept
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = {r.data.params["kd.preset"]: r for r in runs if r.data.tags.get("role") == "trial"}
    assert sorted(trials) == sorted(PRESETS)
    for preset, trial in trials.items():
        assert trial.data.tags["state"] == "finished" and trial.data.params["kd.method"] == "combo"
        m = trial.data.metrics
        assert 0 < m["test/accuracy"] <= 1 and m["test/loss"] > 0 and m["n_seeds"] == 2
        assert "test/accuracy_std" in m and "test/loss_std" in m
        seeds = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert sorted(r.data.tags["seed"] for r in seeds) == ["0", "1"]
        for run in seeds:
            logged = {
                k.removeprefix("train/") for k in run.data.metrics if k.startswith("train/") and "/" in k[6:]
            }
            assert logged == set(TERMS[preset])  # only the preset's terms, named <method>/<term>
            for term in TERMS[preset]:
                history = client.get_metric_history(run.info.run_id, f"train/{term}")
                assert [h.step for h in history] == [0, 1]
            assert {"test/accuracy", "test/loss"} <= set(run.data.metrics)


def test_report_classification_table_has_a_row_per_preset(swept, tmp_path):
    report = pytest.importorskip("harness.report.__main__")
    import pandas as pd

    store, name = swept
    args = ["--study", name, "--tracking-uri", store, "--out", str(tmp_path), "--no-plots", "--no-log"]
    assert report.main(args) == 0
    frame = pd.read_csv(tmp_path / name / "classification.csv")
    assert {"test loss", "test loss std", "test accuracy", "test accuracy std"} <= set(frame.columns)
    labels = [" ".join(str(v) for v in row) for row in frame.iloc[:, :2].itertuples(index=False)]
    assert len(frame) == len(PRESETS) and all(any(p in text for text in labels) for p in PRESETS), (
        f"one row per kd.preset expected (seed 003's rows), got {labels}; "
        "the report must tell combo presets apart"
    )
    lines = (tmp_path / name / "classification.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]  # the header, then one line per row
    # test loss and test accuracy as mean ± std in every row
    assert len(rows) == len(PRESETS) and all(row.count(" ± ") == 2 for row in rows)
