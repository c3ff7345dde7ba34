"""Everything MLflow: the store and its named queries, the tracking server, PostgreSQL, provenance."""

from harness.tracking.mlflow_store import Run, Tracker, tracking_uri

__all__ = ["Run", "Tracker", "tracking_uri"]
