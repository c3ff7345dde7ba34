"""MLflow's Model Registry: an exported ONNX model logged in MLflow's ``onnx`` flavour (signature, input
example, the package's other files) on an export run and registered as a new version of a named model,
with tags; and the versions of a model, read back. Works against a SQLite store and a tracking server
(artifacts go through the server when it proxies them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.tracking.mlflow_store import Run, Tracker


@dataclass
class Registered:
    name: str
    version: int
    uri: str  # models:/<name>/<version>
    model_id: str  # the LoggedModel holding its files
    run_id: str  # the export run it was logged on


def _client(tracker: Tracker):
    """A client whose registry is the tracker's store (a bare client takes the process's registry URI)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracker.uri, registry_uri=tracker.uri)


def experiment_of(tracker: Tracker, run_id: str) -> str:
    """The name of the experiment that holds ``run_id``."""
    client = tracker._client
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def _spec(shape: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


def register_onnx(
    tracker: Tracker,
    run: Run,
    *,
    name: str,
    onnx_path: Path,
    input_shape: list,
    output_shape: list,
    example: np.ndarray,
    extra_files: list[Path],
    tags: dict[str, str],
    description: str = "",
) -> Registered:
    """Log ``onnx_path`` on ``run`` and register it as the next version of model ``name``, tagged."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), _spec(input_shape), "input")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), _spec(output_shape), "logits")]),
    )
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    with mlflow.start_run(run_id=run.id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            signature=signature,
            input_example=example.astype(np.float32),
            extra_files=[str(p) for p in extra_files],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=_requirements(),  # stated: inferring them runs a subprocess (~10 s)
            tags={"study": tags.get("study", name)},
        )
    found = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    version = int(found.version)
    if description:
        _client(tracker).update_model_version(name, str(version), description=description)
    return Registered(name, version, f"models:/{name}/{version}", info.model_id, run.id)


def _requirements() -> list[str]:
    """What serving the model needs, at the versions this process has."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("onnx", "onnxruntime", "numpy")]


def model_versions(tracker: Tracker, name: str) -> list[dict]:
    """The registered versions of model ``name``, oldest first: ``version``, ``run_id``, ``source``,
    ``tags``; empty when no such model is registered."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(tracker).search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    rows = [
        {"version": int(v.version), "run_id": v.run_id, "source": v.source, "tags": dict(v.tags)}
        for v in found
    ]
    return sorted(rows, key=lambda r: r["version"])
