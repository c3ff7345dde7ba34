"""``python -m harness sweep`` (run a study, optionally with several local workers) and ``worker`` (join one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from harness.errors import HarnessError


def register(sub) -> None:
    sweep = sub.add_parser("sweep", help="run (or resume) the Optuna study of a study file")
    _common(sweep)
    sweep.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    sweep.set_defaults(func=cmd_sweep)

    worker = sub.add_parser(
        "worker", help="join a study as one worker (scale-out: many machines, one storage)"
    )
    _common(worker)
    worker.add_argument("--worker-index", type=int, default=None, help="distinguishes workers' sampler seeds")
    worker.add_argument(
        "--heartbeat", type=int, default=None, help="RDB storage heartbeat seconds (default 30 for RDB)"
    )
    worker.add_argument(
        "--per-gpu",
        type=int,
        default=1,
        metavar="N",
        help="worker processes per visible GPU (default 1); with several GPUs, or N > 1, this "
        "process starts one worker per slot, each with its own CUDA_VISIBLE_DEVICES",
    )
    worker.set_defaults(func=cmd_worker)


def _common(p) -> None:
    p.add_argument("--study", required=True, help="study file, e.g. studies/quickstart.yaml")
    p.add_argument("--trials", type=int, help="override budget.trials")
    p.add_argument("--timeout", type=float, help="override budget.timeout (seconds)")
    p.add_argument(
        "--storage", help="Optuna storage: a journal file (default mlruns/optuna/journal.log) or an RDB URL"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    p.add_argument("--quiet", action="store_true", help="no live display")


def _prepare(args):
    """Validate everything, then resolve the teacher and the parent run. Nothing is written before validation."""
    from harness.study_config import load_study

    study = load_study(args.study)
    if args.trials is not None:
        study.budget.trials = args.trials
    if args.timeout is not None:
        study.budget.timeout = args.timeout
    return study


def _is_rdb(url: str | None) -> bool:
    return bool(url) and "://" in url


def cmd_sweep(args) -> int:
    from harness.sweep import ensure_teacher, finish_parent, open_parent
    from harness.tracking import Tracker

    study = _prepare(args)
    tracker = Tracker(args.tracking_uri)
    ensure_teacher(study, tracker)
    parent = open_parent(tracker, study, args.storage)
    try:
        if args.workers <= 1:
            from harness.sweep import run_in_process

            state = run_in_process(study, tracker, parent, args.storage, quiet=args.quiet)
        else:
            state = run_local_workers(study, tracker, parent, args)
    except HarnessError as exc:
        parent.set_tags({"failure": str(exc)[:500]})
        parent.end("failed")
        raise
    return finish_parent(study, tracker, parent, args.storage, state)


def cmd_worker(args) -> int:
    from harness.sweep import ensure_teacher, finish_parent, open_parent, run_in_process
    from harness.tracking import Tracker

    study = _prepare(args)
    tracker = Tracker(args.tracking_uri)
    ensure_teacher(study, tracker)
    slots = gpu_slots(args.per_gpu)
    if len(slots) > 1:
        return run_gpu_workers(args, slots)
    parent = open_parent(tracker, study, args.storage, reopen=False)
    heartbeat = args.heartbeat if args.heartbeat is not None else (30 if _is_rdb(args.storage) else None)
    worker = args.worker_index if args.worker_index is not None else os.getpid()
    state = run_in_process(
        study, tracker, parent, args.storage, quiet=args.quiet, heartbeat=heartbeat, worker=worker
    )
    if (
        state == "spent"
    ):  # every worker that sees the budget spent updates the parent run's summary and closes it
        return finish_parent(study, tracker, parent, args.storage, "finished", announce=not args.quiet)
    return 0 if state == "finished" else (130 if state == "interrupted" else 1)


def gpu_slots(per_gpu: int = 1) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per worker: each visible GPU ``per_gpu`` times; [] without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    return [g for g in gpus for _ in range(max(1, per_gpu))]


def run_gpu_workers(args, slots: list[str]) -> int:
    """One worker process per slot, each pinned to its GPU with CUDA_VISIBLE_DEVICES; waits for all of them."""
    cmd = [sys.executable, "-m", "harness", "worker", "--study", args.study, "--per-gpu", "1", "--quiet"]
    for flag, value in (
        ("--storage", args.storage),
        ("--tracking-uri", args.tracking_uri),
        ("--trials", args.trials),
        ("--timeout", args.timeout),
        ("--heartbeat", args.heartbeat),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    procs = []
    for i, gpu in enumerate(slots):
        index = [] if args.worker_index is None else ["--worker-index", str(args.worker_index * 100 + i)]
        print(f"worker {i}: CUDA_VISIBLE_DEVICES={gpu}", flush=True)
        procs.append(subprocess.Popen([*cmd, *index], env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait(timeout=60)
        return 130
    return 0 if all(c == 0 for c in codes) else 1


def run_local_workers(study, tracker, parent, args) -> str:
    """Several worker processes on this machine. With the local SQLite MLflow store they log through one
    ``mlflow server`` process (SQLite does not take concurrent writers well)."""
    from harness.sweep import watch
    from harness.tracking_server import local_server

    with local_server(tracker.uri) as uri:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        cmd = [sys.executable, "-m", "harness", "worker", "--study", args.study, "--quiet"]
        for flag, value in (
            ("--storage", args.storage),
            ("--trials", study.budget.trials),
            ("--timeout", study.budget.timeout),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        procs = [subprocess.Popen([*cmd, "--worker-index", str(i)], env=env) for i in range(args.workers)]
        try:
            watch(study, args.storage, lambda: all(p.poll() is not None for p in procs), quiet=args.quiet)
        except KeyboardInterrupt:
            for p in procs:
                p.send_signal(2)
            for p in procs:
                p.wait(timeout=60)
            return "interrupted"
        codes = [p.wait() for p in procs]
    if any(c not in (0,) for c in codes):
        raise HarnessError(f"worker exit codes {codes}; see their output above")
    time.sleep(0)
    return "finished"
