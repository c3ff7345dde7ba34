"""Command line: python -m harness {train,sweep,worker,export}. Reports: python -m harness.report."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from harness.errors import ConfigError, HarnessError


def parse_overrides(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args) -> int:
    from harness.config import load_experiment
    from harness.data.base import quality_metric, task_of
    from harness.engine import distributed
    from harness.engine.progress import console, epoch_progress
    from harness.engine.run import run_experiment
    from harness.tracking import Tracker

    cfg = load_experiment(args.config, parse_overrides(args.set))
    ctx = distributed.setup(cfg.train.device)  # launched by torchrun: join the group
    with distributed.main_first(ctx):  # rank 0 creates a fresh store before the others open it
        tracker = Tracker(args.tracking_uri)
    role = "teacher" if cfg.kd.method == "none" else "student"
    main_rank = ctx.main  # under torchrun, rank 0 alone shows and logs the run
    with epoch_progress(cfg.train.epochs, cfg.name, enabled=not args.quiet and main_rank) as progress:
        outcome = run_experiment(
            cfg, tracker, experiment=args.experiment or cfg.name, progress=progress, role=role
        )
    if not main_rank:
        return 0 if outcome.state == "finished" else 1
    m = outcome.metrics
    if outcome.state != "finished":
        console.print(
            f"[red]run {outcome.run_id} {outcome.state}[/red]: see its 'failure' tag in the MLflow UI"
        )
        return 1
    key = quality_metric(task_of(m))
    console.print(
        f"[green]run {outcome.run_id} finished[/green]: val/{key} {m[f'val/{key}']:.4f}  "
        f"test/{key} {m[f'test/{key}']:.4f}  ms/image {m['ms_per_image']:.2f}  store {tracker.uri}"
    )
    return 0


def _load_study(args):
    """The validated study file with the command line's budget overrides. Nothing is written before this."""
    from harness.sweep.config import load_study

    study = load_study(args.study, name=args.study_name)
    if args.trials is not None:
        study.budget.trials = args.trials
    if args.timeout is not None:
        study.budget.timeout = args.timeout
    return study


def cmd_sweep(args) -> int:
    from harness.sweep.driver import ensure_teacher, finish_parent, open_parent, run_in_process
    from harness.sweep.workers import run_local_workers
    from harness.tracking import Tracker

    study = _load_study(args)
    if args.dry_run:
        return dry_run(study)
    tracker = Tracker(args.tracking_uri)
    ensure_teacher(study, tracker)
    parent = open_parent(tracker, study, args.storage)
    try:
        if args.workers <= 1:
            state = run_in_process(study, tracker, parent, args.storage, quiet=args.quiet)
        else:
            state = run_local_workers(study, tracker, parent, args)
    except HarnessError as exc:
        parent.set_tags({"failure": str(exc)[:500]})
        parent.end("failed")
        raise
    return finish_parent(study, tracker, parent, args.storage, state)


def dry_run(study) -> int:
    """--dry-run: the study file, every example trial's experiment config and the teacher's experiment file
    validated as a sweep reads them; no data, weights, store or storage is touched."""
    from harness.engine.teacher import is_checkpoint, teacher_config
    from harness.sweep.config import example_experiment, example_params

    teacher = example_experiment(study).teacher
    if teacher and not is_checkpoint(teacher):
        teacher_config(teacher)
    n = sum(1 for _ in example_params(study))
    grid = f"; the grid has {len(study.grid())} points" if study.sampler.name == "grid" else ""
    print(
        f"study {study.name}: valid ({n} example configurations of {study.experiment}, teacher "
        f"{teacher or 'none'}{grid}); nothing was trained or written"
    )
    return 0


def cmd_worker(args) -> int:
    from harness.sweep.driver import ensure_teacher, finish_parent, open_parent, run_in_process
    from harness.sweep.group import gpus_per_trial
    from harness.sweep.workers import gpu_groups, gpu_slots, run_gpu_workers
    from harness.tracking import Tracker

    if args.gpus_per_trial < 1:
        raise HarnessError(f"--gpus-per-trial {args.gpus_per_trial}: give 1 or more")
    study = _load_study(args)
    tracker = Tracker(args.tracking_uri)
    ensure_teacher(study, tracker)
    per_trial = args.gpus_per_trial
    slots = gpu_slots(args.per_gpu) if per_trial == 1 else gpu_groups(per_trial)
    if len(slots) > 1:
        return run_gpu_workers(args, slots)
    parent = open_parent(tracker, study, args.storage, reopen=False)
    is_rdb = bool(args.storage) and "://" in args.storage
    heartbeat = args.heartbeat if args.heartbeat is not None else (30 if is_rdb else None)
    worker = args.worker_index if args.worker_index is not None else os.getpid()
    with gpus_per_trial(per_trial):
        state = run_in_process(
            study, tracker, parent, args.storage, quiet=args.quiet, heartbeat=heartbeat, worker=worker
        )
    if (
        state == "spent"
    ):  # every worker that sees the budget spent updates the parent run's summary and closes it
        return finish_parent(study, tracker, parent, args.storage, "finished", announce=not args.quiet)
    return 0 if state == "finished" else (130 if state == "interrupted" else 1)


def cmd_export(args) -> int:
    from harness.export.command import run

    return run(args)


def _store_options(p) -> None:
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    p.add_argument("--quiet", action="store_true", help="no live display")
    p.add_argument(
        "--term-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, stop like Ctrl-C (the running trial is interrupted and queued again) and exit "
        "143 within S seconds (default 30)",
    )


def _study_options(p) -> None:
    p.add_argument("--study", required=True, help="study file, e.g. studies/quickstart.yaml")
    p.add_argument(
        "--study-name",
        help="run the study file under another name, as a new study (default: the file's name)",
    )
    p.add_argument("--trials", type=int, help="override budget.trials")
    p.add_argument("--timeout", type=float, help="override budget.timeout (seconds)")
    p.add_argument(
        "--storage", help="Optuna storage: a journal file (default mlruns/optuna/journal.log) or an RDB URL"
    )
    _store_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one experiment (optionally with a teacher and a kd block)")
    train.add_argument("--config", required=True, help="experiment file, e.g. experiments/digits_seg.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.epochs=2"
    )
    train.add_argument("--experiment", help="MLflow experiment name (default: the config's name)")
    _store_options(train)
    train.set_defaults(func=cmd_train)

    sweep = sub.add_parser("sweep", help="run (or resume) the Optuna study of a study file")
    _study_options(sweep)
    sweep.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the study, experiment and teacher files; train nothing",
    )
    sweep.set_defaults(func=cmd_sweep)

    worker = sub.add_parser(
        "worker", help="join a study as one worker (scale-out: many machines, one storage)"
    )
    _study_options(worker)
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
    worker.add_argument(
        "--gpus-per-trial",
        type=int,
        default=1,
        metavar="N",
        help="train each seed of a trial on N processes with torch's DistributedDataParallel (a torchrun "
        "group; one GPU each, or N gloo processes without CUDA); with more GPUs, one worker per N of them",
    )
    worker.set_defaults(func=cmd_worker)

    from harness.export.command import add_arguments as export_arguments

    export = sub.add_parser(
        "export", help="export a study's chosen student to ONNX and register it in MLflow"
    )
    export_arguments(export)
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.sweep.workers import TERM_EXIT, install_sigterm, terminated

    args = build_parser().parse_args(argv)
    restore = install_sigterm(getattr(args, "term_grace", 30.0))
    try:
        code = args.func(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        restore()
    return TERM_EXIT if code == 130 and terminated() else code
