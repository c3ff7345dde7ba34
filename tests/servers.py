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


class TrackingServer:
    """An ``mlflow server`` on one loopback port that a test stops and starts again (same backend, same
    port, same artifacts), or freezes (SIGSTOP) and thaws, as a server that restarts or hangs."""

    def __init__(self, backend: str, folder: Path):
        from harness.tracking.postgres import free_port

        self.backend, self.folder = backend, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from harness.tracking.server import server_command, server_env, wait_healthy

        cmd = server_command(self.folder / "artifacts", port=self.port, workers=1)
        log = open(self.folder / "server.log", "ab")
        env = {**os.environ, **server_env(self.backend)}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        wait_healthy(self.url, self.proc, timeout=180)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a frozen server cannot stop
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


KILL_WHILE_WRITING = (
    "import sys; from tests.servers import kill_while_writing; kill_while_writing(sys.argv.pop(1), "
    "sys.argv.pop(1)); from harness.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def killed_while_writing(what: str, name: str, *args: str) -> list[str]:
    """A harness command that kills itself while writing a file called ``name``: in ``torch.save`` (what
    = 'save') or in the copy of an artifact into the store (what = 'upload'); see ``kill_while_writing``."""
    return [sys.executable, "-c", KILL_WHILE_WRITING, what, name, *args]


def kill_while_writing(what: str, name: str) -> None:
    """In this process, the first write of a file whose name contains ``name`` writes half its bytes,
    flushes them to disk and kills the process with SIGKILL (a machine losing power, the OOM killer).
    'save' cuts ``torch.save`` short; 'upload' the copy of an artifact into the store (``shutil.copyfileobj``,
    which MLflow's local artifact repository uses)."""
    import io
    import shutil
    import signal

    def die(out, data: bytes) -> None:
        out.write(data[: len(data) // 2])
        out.flush()
        os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    if what == "save":
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if name not in str(getattr(f, "name", f)):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            die(f if hasattr(f, "write") else open(f, "wb"), buffer.getvalue())

        torch.save = save
    elif what == "upload":
        real_copy = shutil.copyfileobj

        def copyfileobj(src, dst, *args, **kwargs):
            if name not in str(getattr(src, "name", "")):
                return real_copy(src, dst, *args, **kwargs)
            die(dst, src.read())

        shutil.copyfileobj = copyfileobj
    else:
        raise ValueError(what)
