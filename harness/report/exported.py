"""The exported configuration (``python -m harness export``): its registered model version and its ms/image
with onnxruntime beside PyTorch's, as the export recorded them on the study's parent run (``export.*``
tags, the latest export's; the model version carries the same tags)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.report.load import StudyRuns
from harness.report.markdown import Table


def exported_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    parent = study.parent
    if parent is None or pd.isna(parent.get("tags.export.model", np.nan)):
        return None
    tag = lambda key: parent.get(f"tags.export.{key}")  # noqa: E731
    trial = pd.to_numeric(tag("trial"), errors="coerce")
    row = (
        groups[groups["trials"].map(lambda t: trial in t)] if len(groups) and pd.notna(trial) else groups[:0]
    )
    quality = study.quality
    frame = pd.DataFrame(
        {
            "model version": [tag("model")],
            "trial": [int(trial) if pd.notna(trial) else np.nan],
            "seed": [pd.to_numeric(tag("seed"), errors="coerce")],
            quality: [row[quality].iloc[0] if len(row) else np.nan],
            f"{quality} std": [row[f"{quality} std"].iloc[0] if len(row) else np.nan],
            f"{quality} n": [row[f"{quality} n"].iloc[0] if len(row) else np.nan],
            "onnxruntime ms/image": [pd.to_numeric(tag("ms_per_image.onnxruntime"), errors="coerce")],
            "PyTorch ms/image": [pd.to_numeric(tag("ms_per_image.pytorch"), errors="coerce")],
        }
    )
    return Table(
        "exported",
        "Exported model",
        frame,
        f"The configuration `python -m harness export` shipped (its seed run {tag('source_run')}, export run "
        f"{tag('run')}). ms/image of the ONNX model with onnxruntime and of the PyTorch model, both on the CPU: "
        f"{tag('timing')}.",
    )
