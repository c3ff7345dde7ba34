"""Shared fixtures: tiny real experiments (16x16 or 32x32 digit canvases, 2-channel UNets)
and temporary stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

# The tests' models are tiny: one thread avoids thread start-up costs that dominate such small convolutions.
torch.set_num_threads(1)

TINY_DATA = {"source": "digits_seg", "image_size": 32, "train": 48, "val": 16, "test": 16, "seed": 0}
TINY_TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.01, "seed": 0}


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow SQLite store; the default for everything in the test."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_teacher(tmp_path) -> Path:
    return write_yaml(
        tmp_path / "experiments" / "teacher.yaml",
        {
            "name": "tiny_teacher",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 4, "depth": 3},
            "train": TINY_TRAIN,
        },
    )


@pytest.fixture
def tiny_experiment(tmp_path, tiny_teacher) -> Path:
    return write_yaml(
        tmp_path / "experiments" / "student.yaml",
        {
            "name": "tiny_student",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": TINY_TRAIN,
            "teacher": str(tiny_teacher),
        },
    )
