"""Command line: ``python -m harness.report --study all|<name> [--out reports/] [--format md,csv]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import HarnessError

FORMATS = ("md", "csv")


class UsageError(HarnessError):
    """Bad arguments (exit status 2, like argparse's)."""

    exit_code = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__)
    p.add_argument("--study", required=True, help="a study's name (its MLflow experiment), or 'all'")
    p.add_argument(
        "--out", default="reports", help="output folder; one subfolder per study (default reports/)"
    )
    p.add_argument("--format", default="md,csv", help="comma-separated: md, csv (default md,csv)")
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)"
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--no-log", action="store_true", help="don't log the files as artifacts of the study's parent run"
    )
    return p


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"--format {text!r}: use a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _open_store(uri: str | None):
    from harness.tracking import Tracker, tracking_uri

    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UsageError(
            f"no MLflow store at {uri}; run a study first (make sweep) or set MLFLOW_TRACKING_URI"
        )
    return Tracker(uri)


def run(args) -> int:
    from harness.report.across import write_all
    from harness.report.build import analyse, write
    from harness.report.load import ReportError

    formats = _formats(args.format)
    tracker = _open_store(args.tracking_uri)
    known = tracker.study_names()
    out = Path(args.out)
    if args.study != "all" and args.study not in known:
        raise ReportError(
            f"no study named {args.study} in {tracker.uri}; known studies: {', '.join(known) or 'none'}", 2
        )
    names = known if args.study == "all" else [args.study]
    if not names:
        raise ReportError(f"no studies in {tracker.uri}; run one first (make sweep)", 1)
    reports = []
    for name in names:
        try:
            report = analyse(tracker, name)
        except ReportError as exc:
            if args.study != "all":
                raise
            print(f"skipped {name}: {exc}")
            continue
        write(report, tracker, out / name, formats, with_plots=not args.no_plots, log=not args.no_log)
        reports.append(report)
        where = out / name / ("README.md" if "md" in formats else "")
        print(f"study {name}: {len(report.tables)} tables, {len(report.images)} plots -> {where}")
        if report.finding:
            print(f"  {report.finding}")
    if not reports:
        raise ReportError("no study has finished trials yet; nothing to report", 1)
    if args.study == "all":
        write_all(reports, out / "all", formats, with_plots=not args.no_plots)
        print(f"all studies -> {out / 'all'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the store itself failing (server down, bad URI): one line, not a traceback
        if type(exc).__module__.startswith(("mlflow", "sqlalchemy", "requests")):
            print(
                f"error: reading the MLflow store failed: {type(exc).__name__}: {str(exc)[:300]}",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
