"""``python -m harness.report``: tables (markdown, CSV) and plots (PNG) from a study's MLflow runs.

Modules, one job each: ``load`` (runs -> frames), ``groups`` (configurations pooled over seeds, ms/image
per architecture), ``tables`` and ``compare`` (the tables; KD against the no-KD baseline), ``cells`` (cells
with their finished / diverged / failed seed counts, Div. rows), ``fairness`` (tuning trials, schedules),
``stats`` (paired t-intervals, Holm-corrected verdicts, Pareto front), ``plots``, ``markdown`` (table
writer), ``build`` (one study's folder), ``across`` (all studies).
"""

from harness.report.build import StudyReport, analyse, write
from harness.report.load import ReportError, load_study

__all__ = ["ReportError", "StudyReport", "analyse", "load_study", "write"]
