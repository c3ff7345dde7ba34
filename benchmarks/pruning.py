"""Benchmark 4: the same 30-trial study with and without the median pruner: epochs spent and best value.

Both studies search width and learning rate of a no-KD k-UNet on digits_seg (400 training canvases,
6 epochs a trial) with the same seeded TPE sampler; the only difference is the pruner.

    python benchmarks/pruning.py [--trials 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from benchmarks.common import table, write_section  # noqa: E402
from harness.cli import main as harness_main  # noqa: E402
from harness.tracking import Tracker  # noqa: E402

EXPERIMENT = {
    "name": "prune_bench",
    "data": {"source": "digits_seg", "image_size": 64, "train": 400, "val": 100, "test": 100, "seed": 0},
    "model": {"name": "unet", "width": 4},
    "train": {"epochs": 6, "batch_size": 32, "seed": 0},
}


def study(name: str, experiment: Path, trials: int, pruner: str) -> dict:
    return {
        "name": name,
        "experiment": str(experiment),
        "budget": {"trials": trials},
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 8},
        "pruner": {"name": pruner, "warmup_epochs": 1, "startup_trials": 5},
        "search": {
            "model.width": {"choices": [2, 4, 8]},
            "train.lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
        },
    }


def epochs_spent(tracker: Tracker, name: str) -> int:
    runs = tracker.runs_frame([name])
    seeds = runs[runs["tags.role"] == "seed"]
    return sum(len(tracker.metric_history(run_id, "train/loss")) for run_id in seeds["run_id"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        exp = Path(tmp) / "exp.yaml"
        exp.write_text(yaml.safe_dump(EXPERIMENT))
        tracker = Tracker()
        for pruner in ("none", "median"):
            name = f"prune_{pruner}"
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(study(name, exp, args.trials, pruner)))
            start = time.perf_counter()
            assert (
                harness_main(["sweep", "--study", str(path), "--storage", f"{tmp}/{name}.log", "--quiet"])
                == 0
            )
            wall = time.perf_counter() - start
            runs = tracker.runs_frame([name])
            trials = runs[runs["tags.role"] == "trial"]
            best = trials.loc[trials["tags.state"] == "finished", "metrics.val/miou"].max()
            pruned = int((trials["tags.state"] == "pruned").sum())
            rows.append(
                {
                    "pruner": pruner,
                    "trials": len(trials),
                    "pruned": pruned,
                    "epochs spent": epochs_spent(tracker, name),
                    "best val/miou": f"{best:.4f}",
                    "wall s": f"{wall:.0f}",
                }
            )
    saved = 1 - rows[1]["epochs spent"] / rows[0]["epochs spent"]
    body = (
        f"{args.trials} trials, TPE (seed 0, 8 startup trials) over model.width {{2, 4, 8}} and train.lr "
        "[1e-4, 3e-2] (log), no KD, 6 epochs a trial, 400 training canvases. Median pruner: 5 startup "
        "trials, 1 warm-up epoch.\n\n"
        + table(rows, ["pruner", "trials", "pruned", "epochs spent", "best val/miou", "wall s"])
        + f"\n\nThe pruner saved **{100 * saved:.0f}%** of the epochs."
    )
    write_section("4. Pruning", body)


if __name__ == "__main__":
    main()
