"""Whether a KD comparison can mean anything: the no-KD student against the trivial predictor, and the
teacher against the no-KD student.

The engine logs on every run the test score of the trivial predictor (``trivial/test_miou``: the train
split's majority class for every pixel; ``trivial/test_accuracy`` for classification) and, for binary
one-channel segmentation, of the best single intensity threshold (``trivial/threshold_test_miou``). A no-KD
student within ``TRIVIAL_MARGIN`` of the stronger of them has learned next to nothing, and a teacher less than ``TEACHER_MARGIN``
above the best no-KD student has nothing to teach it: in either case the finding warns instead of
presenting KD verdicts as findings. Runs logged before the metric existed: the report says it is not
recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.report.load import StudyRuns
from harness.report.markdown import number

TRIVIAL_MARGIN = 0.05  # the no-KD student must score more than this above the trivial predictor
TEACHER_MARGIN = 0.02  # the teacher must score at least this above the best no-KD student
TRIVIAL_WHAT = {
    "segmentation": "majority class of the train split for every pixel",
    "classification": "majority class of the train split for every image",
}


THRESHOLD_WHAT = "best single intensity threshold, chosen on the train split"


def trivial_metric(study: StudyRuns, which: str = "majority") -> str:
    """``test/miou`` -> ``trivial/test_miou`` (majority) or ``trivial/threshold_test_miou`` (threshold):
    the engine's names for the trivial predictors' scores."""
    prefix = "threshold_" if which == "threshold" else ""
    return f"trivial/{prefix}{study.quality.replace('/', '_')}"


def _median(study: StudyRuns, seeds: pd.DataFrame, which: str) -> float:
    col = f"metrics.{trivial_metric(study, which)}"
    if col not in seeds:
        return np.nan
    values = pd.to_numeric(seeds.loc[seeds["state"] == "finished", col], errors="coerce").dropna()
    return float(values.median()) if len(values) else np.nan


def trivial_scores(study: StudyRuns, seeds: pd.DataFrame) -> dict[str, float]:
    """Each trivial predictor's test score: the median over the finished seed runs that logged it (it
    depends on the data only), NaN when none did. ``threshold`` only where the engine logs it (binary
    one-channel segmentation)."""
    out = {"majority": _median(study, seeds, "majority")}
    threshold = _median(study, seeds, "threshold")
    if np.isfinite(threshold):
        out["threshold"] = threshold
    return out


def trivial_score(study: StudyRuns, seeds: pd.DataFrame) -> float:
    """The strongest trivial predictor's test score (NaN when none was recorded): what a student must beat."""
    scores = [v for v in trivial_scores(study, seeds).values() if np.isfinite(v)]
    return max(scores) if scores else np.nan


def trivial_text(study: StudyRuns, seeds: pd.DataFrame, qlabel: str) -> str:
    what = TRIVIAL_WHAT.get(study.task, "majority class")
    scores = trivial_scores(study, seeds)
    if np.isnan(scores["majority"]):
        return (
            f"trivial predictor ({what}): not recorded (`{trivial_metric(study)}` is missing: runs logged "
            "before the engine recorded it), so the report cannot tell whether the student learned anything"
        )
    text = f"trivial predictor ({what}) {qlabel} {number(scores['majority'])}"
    if "threshold" in scores:
        text += f"; trivial predictor ({THRESHOLD_WHAT}) {qlabel} {number(scores['threshold'])}"
    return text


def warnings(students: Sequence[tuple[str, float, float]], teacher: float, qlabel: str) -> list[str]:
    """Why the comparison cannot mean anything, if it cannot: ``students`` holds each baseline's name, its
    test score and the trivial score of its runs; ``teacher`` the teacher's test score (NaN: not found)."""
    out = [
        f"{name} scores {number(score)} {qlabel}, "
        + ("no better than" if score <= trivial else f"within {TRIVIAL_MARGIN:g} of")
        + f" the trivial predictor ({number(trivial)}): the student has hardly learned the task"
        for name, score, trivial in students
        if np.isfinite(score) and np.isfinite(trivial) and score - trivial <= TRIVIAL_MARGIN
    ]
    scores = [s for _, s, _ in students if np.isfinite(s)]
    if scores and np.isfinite(teacher) and teacher - max(scores) < TEACHER_MARGIN:
        out.append(
            f"the teacher ({number(teacher)} {qlabel}) is less than {TEACHER_MARGIN:g} above the best no-KD "
            f"student ({number(max(scores))}): it has little to teach"
        )
    return out


def warning_finding(found: Sequence[str]) -> str:
    """The finding when a check failed: the reasons, and that the verdicts are not findings."""
    return (
        f"No finding: {'; '.join(found)}. The KD verdicts in the table below are not findings until the "
        f"no-KD student is clearly above the trivial predictor (by more than {TRIVIAL_MARGIN:g}) and the "
        f"teacher clearly above it (by {TEACHER_MARGIN:g} or more): train longer, or use a stronger teacher."
    )
