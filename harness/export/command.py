"""``python -m harness export``: choose, export, verify, time, package, register, link. Every check runs
before anything is written to the store, so a refused export registers nothing."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "exports/{name}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--study", help="study name: export its best configuration on the validation objective"
    )
    which.add_argument("--run", help="MLflow run id: a seed, trial or study run, or a `harness train` run")
    p.add_argument("--trial", type=int, help="export this trial's configuration instead of the best")
    p.add_argument("--seed", type=int, help="export this seed's run (default: the seed nearest the mean)")
    p.add_argument("--out", help=f"package folder (default {DEFAULT_OUT.format(name='<model name>')})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the ms/image timing (default 1)")
    p.add_argument(
        "--val-images", type=int, default=256, help="validation images to verify on (default 256: the first)"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )


def run(args) -> int:
    from harness.export.steps import build, publish
    from harness.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    built = build(tracker, args)
    for line in built.lines():
        print(line, flush=True)
    registered = publish(tracker, built)
    print(
        f"registered {registered.uri} (export run {registered.run_id}, model {registered.model_id}) "
        f"in {tracker.uri}; package {built.folder}/README.md",
        flush=True,
    )
    return 0
