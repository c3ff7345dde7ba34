"""Worker processes: several on this machine sharing one study, or one per GPU slot; SIGTERM as a clean
stop (a scheduler's preemption, ``scancel``, Slurm's ``--signal``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from harness.errors import HarnessError
from harness.tracking.urls import password_env


def child_storage(storage: str | None) -> tuple[str | None, dict[str, str]]:
    """The storage URL a worker process is given on its command line (without a password, which anyone
    on the machine could read there) and the environment that hands the password to libpq instead."""
    if storage is None or "://" not in storage:
        return storage, {}
    return password_env(storage)


TERM_GRACE = 30.0  # seconds from SIGTERM to exit, by default (--term-grace)
TERM_EXIT = 143  # 128 + SIGTERM, what shells and schedulers expect of a process stopped by SIGTERM
_terminated = threading.Event()
_timers: list[threading.Timer] = []


def terminated() -> bool:
    """Whether this process got SIGTERM: an interrupted trial is then queued again for another worker."""
    return _terminated.is_set()


def install_sigterm(grace: float = TERM_GRACE):
    """SIGTERM stops this process the way Ctrl-C does (the running trial ends as interrupted, storage and
    runs stay consistent), and within ``grace`` seconds: a stop still unfinished then exits at once (the
    trial's lease expires and it is re-queued as for a killed worker). Returns a function that puts the
    previous handler back (for callers that go on running, such as tests calling ``main``)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _terminated.clear()

    def handler(signum, frame):
        if _terminated.is_set():
            return  # a second SIGTERM (the scheduler and our parent both send one): already stopping
        _terminated.set()
        print(f"terminated: stopping within {grace:g} s (SIGTERM)", file=sys.stderr, flush=True)
        timer = threading.Timer(grace, _exit_now, args=(grace,))
        timer.daemon = True
        timer.start()
        _timers.append(timer)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        while _timers:
            _timers.pop().cancel()

    return restore


def _exit_now(grace: float) -> None:
    print(
        f"error: not stopped {grace:g} s after SIGTERM (--term-grace); exiting now, the running trial is "
        "re-queued once its lease expires",
        file=sys.stderr,
        flush=True,
    )
    os._exit(TERM_EXIT)


def _stop_children(procs: list[subprocess.Popen], grace: float = TERM_GRACE) -> None:
    """Pass on Ctrl-C, or SIGTERM when that is what stopped us, and wait for the workers to stop."""
    sig = signal.SIGTERM if terminated() else signal.SIGINT
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    for p in procs:
        try:
            p.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def gpu_slots(per_gpu: int = 1) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per worker: each visible GPU ``per_gpu`` times; [] without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    return [g for g in gpus for _ in range(max(1, per_gpu))]


def gpu_groups(per_trial: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker whose trials take ``per_trial`` GPUs (``--gpus-per-trial``): the
    visible GPUs in groups of that many (a remainder is left idle); [] without CUDA, where a trial's
    processes share the CPU (gloo)."""
    gpus = gpu_slots(1)
    if gpus and len(gpus) < per_trial:
        raise HarnessError(
            f"--gpus-per-trial {per_trial} but {len(gpus)} GPU(s) are visible ({','.join(gpus)}); lower it or "
            "make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
    return [",".join(gpus[i : i + per_trial]) for i in range(0, len(gpus) - per_trial + 1, per_trial)]


def run_gpu_workers(args, slots: list[str]) -> int:
    """One worker process per slot, each pinned to its GPU (or GPUs) with CUDA_VISIBLE_DEVICES;
    waits for all of them."""
    cmd = [sys.executable, "-m", "harness", "worker", "--study", args.study, "--per-gpu", "1", "--quiet"]
    storage, secret = child_storage(args.storage)
    for flag, value in (
        ("--study-name", getattr(args, "study_name", None)),
        ("--storage", storage),
        ("--tracking-uri", args.tracking_uri),
        ("--trials", args.trials),
        ("--timeout", args.timeout),
        ("--term-grace", getattr(args, "term_grace", None)),
        ("--heartbeat", args.heartbeat),
        ("--gpus-per-trial", getattr(args, "gpus_per_trial", None)),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    procs = []
    for i, gpu in enumerate(slots):
        index = [] if args.worker_index is None else ["--worker-index", str(args.worker_index * 100 + i)]
        print(f"worker {i}: CUDA_VISIBLE_DEVICES={gpu}", flush=True)
        env = {**os.environ, **secret, "CUDA_VISIBLE_DEVICES": gpu}
        procs.append(subprocess.Popen([*cmd, *index], env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        _stop_children(procs, getattr(args, "term_grace", TERM_GRACE))
        return 130
    return 0 if all(c == 0 for c in codes) else 1


def run_local_workers(study, tracker, parent, args) -> str:
    """Several worker processes on this machine. With the local SQLite MLflow store they log through one
    ``mlflow server`` process (SQLite does not take concurrent writers well)."""
    from harness.sweep.driver import watch
    from harness.tracking.server import local_server

    with local_server(tracker.uri) as uri:
        storage, secret = child_storage(args.storage)
        env = {**os.environ, **secret, "MLFLOW_TRACKING_URI": uri}
        cmd = [sys.executable, "-m", "harness", "worker", "--study", args.study, "--quiet"]
        for flag, value in (
            ("--study-name", getattr(args, "study_name", None)),
            ("--storage", storage),
            ("--trials", study.budget.trials),
            ("--timeout", study.budget.timeout),
            ("--term-grace", getattr(args, "term_grace", None)),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        procs = [subprocess.Popen([*cmd, "--worker-index", str(i)], env=env) for i in range(args.workers)]
        try:
            watch(study, args.storage, lambda: all(p.poll() is not None for p in procs), quiet=args.quiet)
        except KeyboardInterrupt:
            _stop_children(procs, getattr(args, "term_grace", TERM_GRACE))
            return "interrupted"
        codes = [p.wait() for p in procs]
    if any(c not in (0,) for c in codes):
        raise HarnessError(f"worker exit codes {codes}; see their output above")
    return "finished"
