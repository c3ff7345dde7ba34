"""Seed 002's Tables 5 and 6 in one table: soft, sequential and mixed distillation beside hard labels.

Shown when a study varies ``kd.regime``: one row per configuration (no choosing among them), the no-KD
baseline first as "hard labels (none)", then each regime by temperature. Beside test loss and quality, the
seeds that ended at the trivial predictor: a finished seed whose test score is within ``STUCK_MARGIN`` of the
majority-class predictor's learned nothing (seed 002's soft-trained U-Nets "stuck at 0.48", the class prior).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.distill.base import temperature_keys
from harness.report.cells import stat
from harness.report.groups import varying
from harness.report.load import StudyRuns
from harness.report.markdown import Table
from harness.report.sanity import trivial_metric
from harness.report.tables import SEEDS_NOTE, quality_label, trials_text

REGIME_ORDER = {"hard": 0, "soft": 1, "sequential": 2, "mixed": 3}
STUCK_MARGIN = 0.005


def stuck_seeds(study: StudyRuns, seeds: pd.DataFrame, group) -> str:
    """'k of n': the configuration's finished seeds that scored at the majority-class predictor."""
    runs = seeds[(seeds["group"] == group) & (seeds["state"] == "finished")]
    quality, trivial = f"metrics.{study.quality}", f"metrics.{trivial_metric(study)}"
    if not len(runs) or quality not in runs or trivial not in runs:
        return "–"
    gap = pd.to_numeric(runs[quality], errors="coerce") - pd.to_numeric(runs[trivial], errors="coerce")
    return f"{int((gap.abs() <= STUCK_MARGIN).sum())} of {int(gap.notna().sum())}"


def _order(rows: pd.DataFrame, t_key: str | None) -> pd.DataFrame:
    regime = rows["params.kd.regime"].where(rows["method"] != "none", "hard")
    key = pd.DataFrame(
        {
            "none": rows["method"] != "none",
            "regime": regime.map(lambda r: REGIME_ORDER.get(r, len(REGIME_ORDER))),
            "T": pd.to_numeric(rows[f"params.{t_key}"], errors="coerce") if t_key else 0.0,
        }
    )
    return rows.loc[key.sort_values(["none", "regime", "T"]).index]


def regime_table(study: StudyRuns, groups: pd.DataFrame, seeds: pd.DataFrame) -> Table | None:
    if "params.kd.regime" not in groups or groups["params.kd.regime"].dropna().nunique() < 2:
        return None
    t_keys = [k for k in temperature_keys() if k in varying(groups)]
    t_key = t_keys[0] if t_keys else None
    rows = _order(groups, t_key).reset_index(drop=True)
    none = rows["method"] == "none"
    out = pd.DataFrame({"regime": np.where(none, "hard labels (none)", rows["params.kd.regime"].astype(str))})
    if t_key:
        out["T"] = np.where(none, "–", rows[f"params.{t_key}"].astype(str))
    sequential = rows["params.kd.regime"].eq("sequential") & ~none
    if sequential.any() and "params.kd.soft_epochs" in rows:
        out["soft epochs"] = np.where(sequential, rows["params.kd.soft_epochs"].astype(str), "–")
    stat(out, rows, "test/loss", "test loss")
    stat(out, rows, study.quality, quality_label(study), n=True)
    out["seeds at the trivial predictor"] = [stuck_seeds(study, seeds, g) for g in rows["group"]]
    out["trial #"] = trials_text(rows)
    return Table(
        "regimes",
        "Distillation regimes",
        out,
        "Seed 002 Tables 5 and 6 in one table: soft = KD only; sequential = KD only for the first soft "
        "epochs, then hard labels only; mixed = hard-label CE plus KD (weights kd.alpha, kd.beta); hard "
        "labels (none) = the student without KD. Every configuration is a row. Seeds at the trivial "
        f"predictor: finished seeds whose test score is within {STUCK_MARGIN:g} of the train split's majority "
        f"class everywhere (they learned nothing). {SEEDS_NOTE}",
    )
