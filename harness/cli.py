"""Command line: python -m harness {train,sweep,worker}. Reports: python -m harness.report."""

from __future__ import annotations

import argparse
import sys

import yaml

from harness.errors import HarnessError


def parse_overrides(items: list[str]) -> dict[str, object]:
    out = {}
    for item in items:
        if "=" not in item:
            raise HarnessError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_train(args) -> int:
    from harness.config import load_experiment
    from harness.experiment import run_experiment
    from harness.progress import console, epoch_progress
    from harness.tracking import Tracker

    cfg = load_experiment(args.config, parse_overrides(args.set))
    tracker = Tracker(args.tracking_uri)
    with epoch_progress(cfg.train.epochs, cfg.name, enabled=not args.quiet) as progress:
        outcome = run_experiment(
            cfg,
            tracker,
            experiment=args.experiment or cfg.name,
            progress=progress,
            role="teacher" if cfg.kd.method == "none" else "student",
        )
    m = outcome.metrics
    if outcome.state != "finished":
        console.print(
            f"[red]run {outcome.run_id} {outcome.state}[/red]: see its 'failure' tag in the MLflow UI"
        )
        return 1
    key = "miou" if "test/miou" in m else "accuracy"
    console.print(
        f"[green]run {outcome.run_id} finished[/green]: val/{key} {m[f'val/{key}']:.4f}  test/{key} {m[f'test/{key}']:.4f}  "
        f"ms/image {m['ms_per_image']:.2f}  store {tracker.uri}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one experiment (optionally with a teacher and a kd block)")
    train.add_argument("--config", required=True, help="experiment file, e.g. experiments/digits_seg.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.epochs=2"
    )
    train.add_argument("--experiment", help="MLflow experiment name (default: the config's name)")
    train.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    from harness import study_cli

    study_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
