"""Everything MLflow: the store, experiments per study, parent and child runs, batched logging.

Only this module imports mlflow. The default store is ``sqlite:///mlruns/mlflow.db`` with artifacts
under ``mlruns/artifacts/``; ``MLFLOW_TRACKING_URI`` (or an explicit URI) overrides it, e.g. an
``http://`` tracking server for many workers.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
PARAM_VALUE_LIMIT = 6000

# run status in MLflow for each way a training run can end
RUN_STATUS = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "diverged": "FAILED",
    "pruned": "KILLED",
    "interrupted": "KILLED",
    "abandoned": "KILLED",
}


def tracking_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _quiet_mlflow() -> None:
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our display says where runs are
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    def __init__(self, uri: str | None = None):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)

    def artifact_root(self) -> str | None:
        """Local stores keep artifacts beside the database; a tracking server chooses its own root."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
        return None

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        root = self.artifact_root()
        try:
            return self.client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(
        self, experiment: str, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None
    ) -> Run:
        all_tags = {"mlflow.runName": name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id(experiment), tags=all_tags, run_name=name)
        return Run(self.client, run.info.run_id)

    def search(self, experiments: list[str] | None = None, filter_string: str = "", max_results: int = 5000):
        """Runs as MLflow Run objects; all experiments when none are named."""
        if experiments is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            ids = [
                e.experiment_id
                for n in experiments
                if (e := self.client.get_experiment_by_name(n)) is not None
            ]
        if not ids:
            return []
        return list(self.client.search_runs(ids, filter_string=filter_string, max_results=max_results))

    def experiment_names(self) -> list[str]:
        return [e.name for e in self.client.search_experiments() if e.name != "Default"]

    def runs_frame(self, experiments: list[str] | None = None, filter_string: str = ""):
        """Runs as a pandas DataFrame, one row per run (all pages): ``run_id``, ``experiment``, ``run_name``,
        ``status``, ``start_time``, ``end_time``, then ``params.<key>`` (strings), ``metrics.<key>`` (the
        latest value: highest step) and ``tags.<key>``. All experiments when none are named; unknown names
        are skipped, so an unknown experiment gives an empty frame."""
        import pandas as pd

        found = (
            self.client.search_experiments()
            if experiments is None
            else [e for n in experiments if (e := self.client.get_experiment_by_name(n)) is not None]
        )
        names = {e.experiment_id: e.name for e in found}
        rows, token = [], None
        while names:
            page = self.client.search_runs(
                list(names), filter_string=filter_string, max_results=1000, page_token=token
            )
            for r in page:
                row = {
                    "run_id": r.info.run_id,
                    "experiment": names.get(r.info.experiment_id),
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                    "end_time": r.info.end_time,
                }
                row.update({f"params.{k}": v for k, v in r.data.params.items()})
                row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
                row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
                rows.append(row)
            token = page.token
            if not token:
                break
        return pd.DataFrame(rows, columns=None if rows else ["run_id", "experiment", "run_name", "status"])

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, int, float]]:
        """Every logged value of one metric of one run as (step, timestamp, value), in logging order."""
        history = self.client.get_metric_history(run_id, key)
        return sorted(((m.step, m.timestamp, m.value) for m in history), key=lambda t: (t[1], t[0]))

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def run(self, run_id: str) -> Run:
        return Run(self.client, run_id)


class Run:
    """One MLflow run. Metrics are sent in one batch per call, so an epoch costs one round trip."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.id, str(path), artifact_dir)

    def log_dir(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifacts(self.id, str(path), artifact_dir)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    def log_yaml(self, data: dict[str, Any], name: str) -> None:
        self.log_text(yaml.safe_dump(data, sort_keys=False), name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.id, figure, name)

    def log_torch(self, obj: Any, name: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            torch.save(obj, path)
            self.log_file(path)

    def end(self, state: str = "finished") -> None:
        self.set_tags({"state": state})
        self.client.set_terminated(self.id, status=RUN_STATUS.get(state, "FAILED"))

    def reopen(self) -> None:
        self.client.update_run(self.id, status="RUNNING")
        self.set_tags({"state": "running"})

    def data(self):
        return self.client.get_run(self.id).data
