"""Helpers for tests that run real servers and worker processes: tiny studies, worker commands, bounded
waits, and cleanup of every process a test started (also when it fails)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

from harness.tracking.postgres import sqlalchemy_url
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_study(
    folder: Path, name: str, trials: int, epochs: int, train_images: int = 48, **study: object
) -> Path:
    experiment = write_yaml(
        folder / "experiments" / f"{name}.yaml",
        {
            "name": f"{name}_student",
            "data": {**TINY_DATA, "train": train_images},
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": {**TINY_TRAIN, "epochs": epochs},
        },
    )
    return write_yaml(
        folder / "studies" / f"{name}.yaml",
        {
            "experiment": str(experiment),
            "objective": {"metric": "val/miou", "direction": "maximize"},
            "budget": {"trials": trials},
            "sampler": {"name": "random", "seed": 0},
            "search": {"train.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}},
            **study,
        },
    )


def worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process with its output captured (stdout and stderr together), in its own process group."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill what is still running (a test's ``finally``), with the processes they started."""
    import signal

    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait(timeout=30)


def wait_for(predicate, timeout: float, every: float = 0.3, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = predicate()
        except Exception:  # the store is not there yet
            found = None
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(sqlalchemy_url(storage)))
