"""One seed of a trial trained by a torchrun group: ``python -m harness worker ... --gpus-per-trial N``.

The worker's side (:func:`run_seed`, which the trial calls in place of ``run_experiment``) writes the seed's
recipe into a fresh group directory, starts ``torchrun --standalone --nproc-per-node N -m
harness.sweep.group DIR`` (one GPU per process, or N gloo processes on the CPU) and follows it. Inside the
group (:func:`main`) every rank runs the seed's ``run_experiment`` (engine/distributed.py): rank 0 alone
logs the seed's run, a child of the trial's run, and hands each epoch's metrics to the worker, whose
answer (go on, or pruned) it then broadcasts to the other ranks. Optuna stays in the worker: it reports the
epochs, it is told the trial's end, once.

How a group ends is recorded by the worker, once: rank 0's outcome when all went well; otherwise the seed's
run is ended ``failed`` with the traceback of the rank that caused it as ``traceback.txt`` (torchrun's first
observed failure; a rank killed by a signal left none and torchrun's report stands in), and the trial fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from harness.engine import distributed
from harness.engine.run import Outcome

PROCESSES = "HARNESS_GPUS_PER_TRIAL"  # how --gpus-per-trial reaches the trials of a worker
POLL = 0.05  # seconds between looks at the group directory


def processes_per_trial() -> int:
    return int(os.environ.get(PROCESSES) or 1)


@contextlib.contextmanager
def gpus_per_trial(n: int):
    """Trials started inside the block train each seed on ``n`` processes (1: in this process)."""
    before = os.environ.get(PROCESSES)
    os.environ[PROCESSES] = str(n)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROCESSES, None)
        else:
            os.environ[PROCESSES] = before


class RankFailed(RuntimeError):
    """A rank of a seed's group failed (or was killed); the message names the rank and its last line."""


class Decided(Exception):
    """The worker stopped the seed after an epoch (Optuna pruned the trial)."""


def run_seed(
    cfg,
    tracker,
    *,
    processes: int,
    experiment: str,
    run_name: str | None = None,
    parent_id: str | None = None,
    tags: dict | None = None,
    role: str = "model",
    on_epoch=None,
    stop_states: dict[type, str] | None = None,
    progress=None,
) -> Outcome:
    """``run_experiment``'s contract, trained by ``processes`` ranks: returns rank 0's outcome, re-raises
    what ``on_epoch`` raised for a state in ``stop_states`` (the run ended so), raises :class:`RankFailed`.
    ``progress`` is not shown: the group has no live display."""
    del progress
    stop_states = stop_states or {}
    spec = {
        "config": cfg.model_dump(mode="json"),
        "name": cfg.name,
        "tracking_uri": tracker.uri,
        "experiment": experiment,
        "run_name": run_name,
        "parent_id": parent_id,
        "tags": {k: str(v) for k, v in (tags or {}).items()},
        "role": role,
        "stop_state": next(iter(stop_states.values()), "stopped"),
    }
    with tempfile.TemporaryDirectory(prefix="harness-group-") as tmp:
        where = Path(tmp)
        (where / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        env = {**os.environ, distributed.GROUP_DIR: tmp, "MLFLOW_TRACKING_URI": tracker.uri}
        with open(where / "torchrun.log", "w") as log:
            proc = subprocess.Popen(
                [*cmd, "-m", "harness.sweep.group", tmp], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                stopped = follow(proc, where, on_epoch, stop_states)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the group is stopped and the seed interrupted
                end_group(proc)
                close_run(tracker, where, "interrupted", "interrupted while its group trained")
                raise
        left = read(where, "rank0.done")
        if proc.returncode == 0 and left is not None:
            if isinstance(stopped, BaseException):
                raise stopped  # rank 0 ended its run in the state stop_states gives it
            return Outcome(**left["outcome"])
        if isinstance(stopped, BaseException):  # on_epoch failed (not a stop): that is the seed's failure
            text = "".join(traceback.format_exception(stopped))
            close_run(tracker, where, "failed", f"{type(stopped).__name__}: {stopped}", text)
            raise stopped
        rank, text = distributed.root_failure(where, (where / "torchrun.log").read_text())
        summary = last_line(text)
        close_run(tracker, where, "failed", f"rank {rank} of {processes}: {summary}", text)
        raise RankFailed(f"rank {rank} of {processes} processes: {summary}")


def follow(proc: subprocess.Popen, where: Path, on_epoch, stop_states: dict[type, str]):
    """Answer rank 0's epochs until the group exits: ``on_epoch`` runs here (pruning), and what it raised
    is returned (and rank 0 told to stop) or None."""
    epoch, raised = 0, None
    while True:
        asked = read(where, f"epoch{epoch}")
        if asked is None:
            if proc.poll() is not None:
                return raised
            time.sleep(POLL)
            continue
        answer: dict = {"stop": None}
        try:
            if on_epoch is not None and raised is None:
                on_epoch(asked["epoch"], asked["metrics"])
        except Exception as exc:  # a pruned trial, or a failure of the callback itself
            raised = exc
            known = any(isinstance(exc, t) for t in stop_states)
            answer = {"stop": f"{type(exc).__name__}: {exc}", "known": known}
        write(where, f"answer{epoch}", answer)
        epoch += 1


def end_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to torchrun (it passes it to the ranks), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def close_run(tracker, where: Path, state: str, why: str, text: str | None = None) -> None:
    """End the seed's run (if rank 0 had started one) as ``state``, with ``text`` as its traceback."""
    left = read(where, "run")
    if left is None:
        return
    run = tracker.run(left["run_id"])
    if text:
        run.log_text(text, "traceback.txt")
    run.set_tags({"failure": why[:500]})
    run.end(state)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no output"
    return lines[0] if "without a traceback" in lines[0] else lines[-1]


def read(where: Path, name: str) -> dict | None:
    path = where / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write(where: Path, name: str, payload: dict) -> None:
    tmp = where / f".{name}.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.replace(where / f"{name}.json")


class EpochRelay:
    """Rank 0's epoch callback: hands the metrics to the worker and waits for its answer."""

    def __init__(self, where: Path):
        self.where = where

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        n = len(list(self.where.glob("epoch*.json")))
        write(self.where, f"epoch{n}", {"epoch": epoch, "metrics": metrics})
        while (answer := read(self.where, f"answer{n}")) is None:
            time.sleep(POLL)
        if answer["stop"] is not None:
            if answer["known"]:
                raise Decided(answer["stop"])
            raise RuntimeError(f"the worker's epoch callback failed: {answer['stop']}")


def main(where: str) -> int:
    """One rank of a seed's group (torchrun runs this in each process)."""
    from harness.config import build_experiment
    from harness.engine.run import run_experiment
    from harness.tracking import Tracker

    place = Path(where)
    spec = json.loads((place / "spec.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = build_experiment(spec["config"], spec["name"])
        with distributed.main_first(distributed.setup(cfg.train.device)):
            tracker = Tracker(spec["tracking_uri"])
        outcome = run_experiment(
            cfg,
            tracker,
            experiment=spec["experiment"],
            run_name=spec["run_name"],
            parent_id=spec["parent_id"],
            tags=spec["tags"],
            role=spec["role"],
            on_epoch=EpochRelay(place) if rank == 0 else None,
            stop_states={Decided: spec["stop_state"]},
        )
        left = {"outcome": vars(outcome)}
    except (Decided, distributed.Stopped) as exc:
        left = {"stopped": str(exc)}
    except BaseException:
        distributed.leave_failure(rank)
        raise
    write(place, f"rank{rank}.done", left)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
