"""SIGTERM is a clean stop for ``sweep``, ``worker`` and ``train`` (real processes): the running trial ends
as ``interrupted`` exactly as on Ctrl-C, its parameters are queued again (the next worker trains them), and
the process exits 143 within ``--term-grace``; a stop that hangs past the grace exits 143 at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from tests.conftest import write_yaml
from tests.servers import harness_cmd, start, stop_all, tiny_study, worker_env

pytestmark = pytest.mark.slow
GRACE = 20


def first_epoch_logged(store: str, experiment: str) -> bool:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.role != 'study'") if exp else []
    return any(r.data.metrics.get("train/loss") is not None for r in runs)


def states(store: str, experiment: str) -> dict[str, tuple[str, str]]:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment).experiment_id
    return {
        r.data.tags.get("role", "run"): (r.info.status, r.data.tags.get("state"))
        for r in client.search_runs([exp])
    }


def journal(path) -> optuna.Study:
    return optuna.load_study(study_name="term", storage=JournalStorage(JournalFileBackend(str(path))))


def test_sigterm_interrupts_requeues_and_exits_143(tmp_path):
    study = tiny_study(tmp_path, "term", trials=1, epochs=2000, train_images=480)
    experiment = tmp_path / "experiments" / "term.yaml"
    jobs = {}
    for kind in ("sweep", "worker", "train"):
        folder = tmp_path / kind
        folder.mkdir()
        store = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(store).search_experiments()  # created here: polling a store being created races it
        if kind == "train":
            args = ("train", "--config", str(experiment), "--experiment", "term")
        else:
            args = (kind, "--study", str(study), "--storage", str(folder / "journal.log"))
        cmd = harness_cmd(*args, "--tracking-uri", store, "--term-grace", str(GRACE), "--quiet")
        jobs[kind] = (start(cmd, folder, worker_env()), store, folder)
    try:
        sent = {}
        deadline = time.monotonic() + 240
        while len(sent) < len(jobs) and time.monotonic() < deadline:  # each stopped after its first epoch
            for kind, (proc, store, _) in jobs.items():
                if kind not in sent and _quietly(first_epoch_logged, store, "term"):
                    proc.send_signal(signal.SIGTERM)
                    sent[kind] = time.monotonic()
            time.sleep(0.3)
        codes = {kind: proc.poll() for kind, (proc, _, _) in jobs.items()}
        assert len(sent) == len(jobs), (
            f"only {sorted(sent)} trained an epoch within 240 s; exit codes {codes}"
        )
        stopped = {}
        for kind, (proc, _, _) in jobs.items():
            output, _ = proc.communicate(timeout=GRACE + 10)
            stopped[kind] = (proc.returncode, time.monotonic() - sent[kind], output)
    finally:
        stop_all([proc for proc, _, _ in jobs.values()])

    for kind, (code, seconds, output) in stopped.items():
        assert code == 143, f"{kind}: {output[-2000:]}"
        assert seconds < GRACE, f"{kind} took {seconds:.1f} s to stop"
        assert f"terminated: stopping within {GRACE} s (SIGTERM)" in output and "Traceback" not in output
    assert states(jobs["train"][1], "term") == {"teacher": ("KILLED", "interrupted")}
    for kind in ("sweep", "worker"):
        _, store, folder = jobs[kind]
        expected = {"trial": ("KILLED", "interrupted"), "seed": ("KILLED", "interrupted")}
        if kind == "sweep":
            expected["study"] = ("KILLED", "interrupted")
        assert {k: v for k, v in states(store, "term").items() if k in expected} == expected
        first, queued = journal(folder / "journal.log").get_trials()
        assert first.state == TrialState.FAIL and first.user_attrs["state"] == "interrupted"
        assert queued.state == TrialState.WAITING and queued.user_attrs["retry_of"] == first.number
        assert queued.system_attrs["fixed_params"] == first.params  # the same configuration, queued

    # the same command resumes: it trains the queued configuration, and the budget is met exactly
    write_yaml(experiment, {**_yaml(experiment), "train": {**_yaml(experiment)["train"], "epochs": 1}})
    _, store, folder = jobs["sweep"]
    resume = harness_cmd(
        "sweep",
        "--study",
        str(study),
        "--storage",
        str(folder / "journal.log"),
        "--tracking-uri",
        store,
        "--quiet",
    )
    done = subprocess.run(resume, cwd=folder, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, retried = journal(folder / "journal.log").get_trials()
    assert retried.state == TrialState.COMPLETE and retried.params == first.params


def _quietly(check, *args) -> bool:
    try:
        return check(*args)
    except Exception:  # the store is not created yet
        return False


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_stop_that_hangs_exits_143_after_the_grace(tmp_path):
    script = textwrap.dedent(
        """
        import time
        from harness.sweep.workers import install_sigterm
        install_sigterm(1.0)
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(60)  # a cleanup that never ends
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        stop_all([proc])
    assert proc.returncode == 143 and time.monotonic() - sent < 10
    assert err.strip().splitlines()[-1].startswith("error: not stopped 1 s after SIGTERM (--term-grace)")
