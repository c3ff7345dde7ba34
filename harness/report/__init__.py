"""``python -m harness.report``: tables (markdown, CSV) and plots (PNG) from a study's MLflow runs.

Modules, one job each: ``load`` (runs -> frames), ``groups`` (configurations pooled over seeds, ms/image
per architecture), ``tables`` and ``compare`` (the tables; KD against the no-KD baseline), ``cells`` (cells
with their finished / diverged / failed seed counts, Div. rows), ``fairness`` (tuning trials, schedules),
``stats`` (paired t-intervals, Holm-corrected verdicts, TOST, Pareto front), ``sequential`` (anytime-valid
verdicts for seed rounds), ``decisive`` (which verdicts a study gets: fixed-n or sequential, equivalence,
seeds needed), ``design`` (the study file's seeds, min_effect, arms, confirm from study.yaml), ``sanity``
(trivial predictor and teacher checks), ``arms`` (tuning against confirmation), ``findings`` (the finding
sentence), ``plots``, ``markdown`` (table writer), ``build`` (one study's folder), ``across`` (all
studies).
"""

from harness.report.build import StudyReport, analyse, write
from harness.report.load import ReportError, load_study

__all__ = ["ReportError", "StudyReport", "analyse", "load_study", "write"]
