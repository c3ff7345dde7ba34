"""Everything MLflow: the store, experiments per study, parent and child runs, batched logging.

Only this module imports mlflow. The default store is ``sqlite:///mlruns/mlflow.db`` with artifacts
under ``mlruns/artifacts/``; ``MLFLOW_TRACKING_URI`` (or an explicit URI) overrides it, e.g. an
``http://`` tracking server for many workers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
PARAM_VALUE_LIMIT = 6000
HEARTBEAT_INTERVAL = 10.0  # seconds between a heartbeat run's ``heartbeat`` tags

# run status in MLflow for each way a training run can end
RUN_STATUS = {
    "finished": "FINISHED",
    "failed": "FAILED",
    "diverged": "FAILED",
    "pruned": "KILLED",
    "interrupted": "KILLED",
    "abandoned": "KILLED",
}

# MLflow 3's experiment kind, "Machine learning". The 3.17 UI reads this tag only with its workflow navigation
# off (it is on in the shipped build): it opens experiments by its sidebar's GenAI / Model training switch.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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

        from harness.tracking.credentials import check_login, use_login

        self.uri = tracking_uri(uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        from harness.tracking.outage import retrying_client

        use_login(self.uri)
        # a tracking server that restarts is waited for (HARNESS_TRACKING_RETRY_S), see outage.py
        self._client = retrying_client(MlflowClient(tracking_uri=self.uri), self.uri)
        check_login(self._client, self.uri)

    def artifact_root(self) -> str | None:
        """Local stores keep artifacts beside the database; a tracking server chooses its own root."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
        return None

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if needed, tagged as model training (see EXPERIMENT_KIND)."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is None:
            root = self.artifact_root()
            try:
                return self._client.create_experiment(
                    name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND
                )
            except MlflowException:  # another worker created it first
                found = self._client.get_experiment_by_name(name)
        if not any(k in found.tags for k in EXPERIMENT_KIND):  # older experiments; a kind set by hand stays
            for key, value in EXPERIMENT_KIND.items():
                self._client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def start_run(
        self, experiment: str, name: str, parent_id: str | None = None, tags: dict[str, Any] | None = None
    ) -> Run:
        all_tags = {"mlflow.runName": name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        from harness.tracking.credentials import explained

        with explained(self.uri):  # a login that may read but not write stops here in one line
            run = self._client.create_run(self.experiment_id(experiment), tags=all_tags, run_name=name)
        return Run(self._client, run.info.run_id)

    def _experiment_ids(self, experiments: list[str] | None) -> dict[str, str]:
        """id -> name of the named experiments that exist (all of them when none are named)."""
        if experiments is None:
            found = self._client.search_experiments()
        else:
            found = [e for n in experiments if (e := self._client.get_experiment_by_name(n)) is not None]
        return {e.experiment_id: e.name for e in found}

    def _search(self, experiments: list[str] | None, filter_string: str) -> list:
        ids = list(self._experiment_ids(experiments))
        return (
            list(self._client.search_runs(ids, filter_string=filter_string, max_results=5000)) if ids else []
        )

    def runs_frame(self, experiments: list[str] | None = None):
        """Runs as a pandas DataFrame, one row per run (all pages): ``run_id``, ``experiment``, ``run_name``,
        ``status``, ``start_time``, ``end_time``, then ``params.<key>`` (strings), ``metrics.<key>`` (the
        latest value: highest step) and ``tags.<key>``. All experiments when none are named; unknown names
        are skipped, so an unknown experiment gives an empty frame."""
        import pandas as pd

        names = self._experiment_ids(experiments)
        rows, token = [], None
        while names:
            page = self._client.search_runs(list(names), max_results=1000, page_token=token)
            rows += [_record(r, names.get(r.info.experiment_id)) for r in page]
            token = page.token
            if not token:
                break
        return pd.DataFrame(rows, columns=None if rows else ["run_id", "experiment", "run_name", "status"])

    # Named queries: the only questions the rest of the harness asks the store.

    def finished_run(self, config_hash: str, experiments: list[str] | None = None) -> tuple[str, str] | None:
        """(run id, experiment name) of a finished run of the config with this hash (``ExperimentConfig.hash``)
        in the named experiments (all of them when none are named), if there is one."""
        names = self._experiment_ids(experiments)
        found = self._search(experiments, f"tags.config_hash = '{config_hash}' and tags.state = 'finished'")
        return (found[0].info.run_id, names[found[0].info.experiment_id]) if found else None

    def open_runs(self, experiment: str, config_hash: str) -> list[dict[str, Any]]:
        """Records (as ``run_record``) of the config's runs in ``experiment`` still marked RUNNING."""
        query = f"tags.config_hash = '{config_hash}' and attributes.status = 'RUNNING'"
        return [_record(r, experiment) for r in self._search([experiment], query)]

    def study_names(self) -> list[str]:
        """Experiments that hold a study's parent run (tag role=study)."""
        names = self._experiment_ids(None)
        found = self._search(None, "tags.role = 'study'")
        return sorted({names[r.info.experiment_id] for r in found if r.info.experiment_id in names})

    def parent_run(self, study: str, tags: dict[str, Any]) -> tuple[Run, bool]:
        """The study's one parent run (role=study, the earliest) and whether this call created it. Workers
        started together may each create one: all keep the earliest and delete their own."""
        found = self._parent_ids(study)
        if found:
            return self.run(found[0]), False
        run = self.start_run(study, f"study-{study}", tags={**tags, "role": "study", "optuna.study": study})
        first = self._parent_ids(study)[0]
        if first != run.id:
            self._client.delete_run(run.id)
            return self.run(first), False
        return run, True

    def _parent_ids(self, study: str) -> list[str]:
        runs = self._search([study], "tags.role = 'study'")
        return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]

    def open_trial_runs(self, study: str, trial: int) -> list[Run]:
        """A trial's runs (the trial run and its seed runs) still marked RUNNING."""
        query = f"tags.`optuna.study` = '{study}' and tags.`optuna.trial` = '{trial}'"
        found = self._search([study], query + " and attributes.status = 'RUNNING'")
        return [self.run(r.info.run_id) for r in found]

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """One run as a plain dict (``run_id``, ``run_name``, ``status``, ``params.*``, ``metrics.*``,
        ``tags.*``), or None when the store does not have it."""
        try:
            return _record(self._client.get_run(run_id), None)
        except Exception:  # deleted, or from another store
            return None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, int, float]]:
        """Every logged value of one metric of one run as (step, timestamp, value), in logging order."""
        history = self._client.get_metric_history(run_id, key)
        return sorted(((m.step, m.timestamp, m.value) for m in history), key=lambda t: (t[1], t[0]))

    def download(self, run_id: str, artifact_path: str, dst: str | Path) -> Path:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self._client.download_artifacts(run_id, artifact_path, str(dst)))

    def run(self, run_id: str) -> Run:
        return Run(self._client, run_id)


class Run:
    """One MLflow run. Metrics are sent in one batch per call, so an epoch costs one round trip."""

    def __init__(self, client, run_id: str):
        self._client = client
        self.id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._client.log_artifact(self.id, str(path), artifact_dir)

    def log_dir(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._client.log_artifacts(self.id, str(path), artifact_dir)

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.id, text, name)

    def log_yaml(self, data: dict[str, Any], name: str) -> None:
        self.log_text(yaml.safe_dump(data, sort_keys=False), name)

    def log_figure(self, figure, name: str) -> None:
        self._client.log_figure(self.id, figure, name)

    def end(self, state: str = "finished") -> None:
        self.set_tags({"state": state})
        self._client.set_terminated(self.id, status=RUN_STATUS.get(state, "FAILED"))

    def reopen(self) -> None:
        self._client.update_run(self.id, status="RUNNING")
        self.set_tags({"state": "running"})


class Heartbeat:
    """While active, sets the run's ``heartbeat`` tag (Unix seconds) every ``interval`` seconds from a
    background thread, so another process can tell a live run from one whose process died."""

    def __init__(self, run: Run, interval: float = HEARTBEAT_INTERVAL):
        self.run, self.interval = run, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-heartbeat", daemon=True)

    def _beat(self) -> None:
        self.run.set_tags({"heartbeat": f"{time.time():.0f}"})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the store went away; the run's end is recorded by the main thread
                return

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _record(run, experiment: str | None) -> dict[str, Any]:
    row = {
        "run_id": run.info.run_id,
        "experiment": experiment,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
    return row
