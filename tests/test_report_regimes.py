"""The regimes table (seed 002 Tables 5 and 6): every configuration a row, hard labels first, and the seeds
that ended at the trivial predictor counted; and the row a study's seed rounds judged stays its report's row."""

from __future__ import annotations

import pytest

from harness.report.markdown import md_table
from tests.test_report_rows import Trial, five, report_of, tracker  # noqa: F401  (tracker: a fixture)

TRIVIAL = 0.425


def seeds_of(*values) -> dict:
    return {
        s: {"test/miou": v, "test/loss": 0.1, "trivial/test_miou": TRIVIAL} for s, v in five(*values).items()
    }


def test_every_regime_is_a_row_and_stuck_seeds_are_counted(tracker):  # noqa: F811
    soft = {"kd.method": "response", "kd.regime": "soft", "kd.temperature": 5.0}
    trials = [
        Trial({"kd.regime": "mixed"}, seeds_of(0.86, 0.87, 0.88, 0.87, 0.86)),
        Trial({**soft, "kd.regime": "mixed"}, seeds_of(0.87, 0.87, 0.425, 0.88, 0.87)),
        Trial({**soft, "kd.temperature": 10.0}, seeds_of(0.425, 0.87, 0.425, 0.88, 0.87)),
        Trial(soft, seeds_of(0.425, 0.87, 0.86, 0.88, 0.87)),
        Trial(
            {**soft, "kd.regime": "sequential", "kd.soft_epochs": 8}, seeds_of(0.86, 0.87, 0.87, 0.88, 0.87)
        ),
    ]
    table = report_of(tracker, "regimes_rows", trials).table("regimes")
    frame = table.frame
    assert list(frame["regime"]) == ["hard labels (none)", "soft", "soft", "sequential", "mixed"]
    assert list(frame["T"]) == ["–", "5.0", "10.0", "5.0", "5.0"]
    assert list(frame["seeds at the trivial predictor"]) == ["0 of 5", "1 of 5", "2 of 5", "0 of 5", "1 of 5"]
    assert frame["test mIoU"].iloc[2] == pytest.approx((0.425 * 2 + 0.87 + 0.88 + 0.87) / 5)
    assert "soft epochs" in frame and "| sequential |" in md_table(frame)


def test_no_regimes_table_without_a_regime_to_compare(tracker):  # noqa: F811
    trials = [Trial({}, seeds_of(0.86, 0.87, 0.88, 0.87, 0.86))]
    assert report_of(tracker, "no_regimes", trials).table("regimes") is None


def test_the_row_the_seed_rounds_judged_stays_the_reports_row(tracker):  # noqa: F811
    """Rounds gave seeds 5-6 to T=1 (best when they began); those seeds pulled its mean below T=4's. The
    report must judge T=1, the configuration the rounds judged, not re-choose T=4 and call it open."""
    import json

    from harness.report.build import analyse
    from harness.report.load import load_study
    from tests.test_report_rows import log_study

    seven = dict(enumerate([0.86, 0.87, 0.88, 0.87, 0.86, 0.84, 0.84]))
    t1 = {s: v + 0.02 for s, v in seven.items()}
    t1[5] = t1[6] = 0.80
    trials = [
        Trial({}, seven),
        Trial({"kd.method": "response", "kd.temperature": 4.0}, five(0.88, 0.89, 0.88, 0.885, 0.88)),
        Trial({"kd.method": "response", "kd.temperature": 1.0}, t1),
    ]
    log_study(tracker, "judged_rows", trials)
    parent = load_study(tracker, "judged_rows").parent
    row = {"row": "response", "kd": {"trial": 2, "method": "response"}, "baseline": {"trial": 0}}
    tracker.run(parent["run_id"]).set_tags({"sequential": json.dumps({"phase": "tuning", "rows": [row]})})
    frame = analyse(tracker, "judged_rows").table("baseline").frame
    assert frame.iloc[0]["trial # KD / none"] == "2 / 0" and frame.iloc[0]["seeds paired"] == 7
