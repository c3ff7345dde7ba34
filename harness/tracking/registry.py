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
            registered_model_name=name,
            extra_files=[str(p) for p in extra_files],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
            tags={"study": tags.get("study", name)},
        )
    version = int(info.registered_model_version)
    client = tracker._client
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if description:
        client.update_model_version(name, str(version), description=description)
    return Registered(name, version, f"models:/{name}/{version}", info.model_id, run.id)


def model_versions(tracker: Tracker, name: str) -> list[dict]:
    """The registered versions of model ``name``, oldest first: ``version``, ``run_id``, ``source``,
    ``tags``; empty when no such model is registered."""
    from mlflow.exceptions import MlflowException

    try:
        found = tracker._client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    rows = [
        {"version": int(v.version), "run_id": v.run_id, "source": v.source, "tags": dict(v.tags)}
        for v in found
    ]
    return sorted(rows, key=lambda r: r["version"])
