"""kd-harness: sweeps of knowledge-distillation experiments, tracked in MLflow, driven by Optuna."""

__version__ = "0.1.0"
