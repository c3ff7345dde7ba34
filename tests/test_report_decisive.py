"""Decisive comparisons in the report (issue 22): sequential verdicts for seed rounds, equivalence with
min_effect, seeds needed, the trivial-predictor and teacher checks, and tuning then confirmation.

Studies are logged run by run on small real MLflow stores as tests/test_report_rows.py does (no training),
with the study file's design as the parent run's study.yaml."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from harness.report.build import analyse
from harness.report.load import load_study
from harness.report.markdown import md_table
from harness.report.sequential import decide, seeds_needed
from harness.report.stats import paired_differences, tost_p
from harness.tracking import Tracker
from tests.test_report_rows import NONE, RESPONSE, SEEDS, Trial, log_study

FIVE = {"seeds": list(SEEDS)}


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('decisive') / 'mlflow.db'}")


def report_of(tracker, name, trials, **kw):
    log_study(tracker, name, trials, **kw)
    return analyse(tracker, name)


def shifted(base: dict, diffs) -> dict:
    """Per-seed values base[seed] + diff, seed by seed."""
    return {s: base[s] + d for s, d in zip(sorted(base), diffs)}


def rows(report) -> dict:
    return {r["KD method"]: r for r in report.table("baseline").frame.to_dict("records")}


CWD_SAME = Trial({"kd.method": "cwd"}, shifted(NONE.results, [0.002, -0.001, 0.001, -0.002, 0.0]))
DIST_NOISY = Trial({"kd.method": "dist"}, shifted(NONE.results, [0.03, -0.01, 0.02, 0.0, 0.01]))


def test_fixed_seeds_with_min_effect_call_an_interval_inside_the_margin_equivalent(tracker):
    report = report_of(tracker, "margin", [NONE, CWD_SAME, RESPONSE], design={**FIVE, "min_effect": 0.05})
    by = rows(report)
    d = np.array([0.002, -0.001, 0.001, -0.002, 0.0])
    assert by["cwd"]["verdict"] == "equivalent" and by["response"]["verdict"] == "better"
    assert by["cwd"]["p equivalent (TOST)"] == pytest.approx(float(tost_p(d, 0.05)))
    assert -0.05 < by["cwd"]["difference CI low"] and by["cwd"]["difference CI high"] < 0.05
    assert by["cwd"]["p equivalent (Holm)"] < 0.05 and by["response"]["p (Holm)"] < 0.05
    assert "cwd is equivalent to no KD within ±0.05: " in report.finding
    assert "response is better than no KD" in report.finding
    assert "p equivalent (TOST): two one-sided paired t-tests" in report.table("baseline").note
    # the same runs without a margin: no equivalence, cwd stays undecided
    plain = rows(report_of(tracker, "no_margin", [NONE, CWD_SAME, RESPONSE], design=FIVE))
    assert plain["cwd"]["verdict"] == "undecided" and "p equivalent (TOST)" not in plain["cwd"]


def test_undecided_rows_say_how_many_seeds_a_fixed_test_would_need(tracker):
    report = report_of(tracker, "needed", [NONE, DIST_NOISY, RESPONSE], design={**FIVE, "min_effect": 0.01})
    by = rows(report)
    d = paired_differences(DIST_NOISY.results, NONE.results)
    sd = float(np.std(d, ddof=1))
    assert by["dist"]["verdict"] == "undecided"
    assert by["dist"]["seeds needed"] == seeds_needed(d.mean(), sd) > 5
    assert by["dist"]["seeds needed at 0.01"] == seeds_needed(0.01, sd)
    assert by["response"]["seeds needed"] is None or np.isnan(by["response"]["seeds needed"])
    assert (
        f"With 5 seeds the study cannot decide dist (a fixed-n paired t-test would need, for 80% power: "
        f"dist {seeds_needed(d.mean(), sd)} seeds at its difference, {seeds_needed(0.01, sd)} at min_effect "
        "0.01)." in report.finding
    )


def _rounds(params: dict, values: dict, chunks) -> list[Trial]:
    """One configuration's seeds as a first trial and round trials (tag ``round``) that add seeds with the
    same params, as the sweep's rounds do."""
    return [
        Trial(params, {s: values[s] for s in chunk}, tags={"round": k} if k else {})
        for k, chunk in enumerate(chunks)
    ]


def test_seed_rounds_get_sequential_verdicts_from_several_trial_runs(tracker):
    """seeds {first: 3, max: 9, step: 2}: response decided after 5 seeds, dist at the max undecided, fitnet
    still open at 5; each configuration's seeds come from its first trial and its round trials."""
    rng = np.random.default_rng(0)
    none = dict(enumerate(0.5 + rng.normal(0, 0.02, 9)))
    response = shifted({s: none[s] for s in range(5)}, 0.05 + rng.normal(0, 0.004, 5))
    dist = shifted(none, rng.normal(0, 0.01, 9))
    fitnet = shifted({s: none[s] for s in range(5)}, [0.01, -0.02, 0.03, 0.0, -0.01])
    trials = [
        *_rounds({}, none, [range(3), range(3, 5), range(5, 7), range(7, 9)]),
        *_rounds(RESPONSE.params, response, [range(3), range(3, 5)]),
        *_rounds({"kd.method": "dist"}, dist, [range(3), range(3, 5), range(5, 7), range(7, 9)]),
        *_rounds({"kd.method": "fitnet"}, fitnet, [range(3), range(3, 5)]),
    ]
    report = report_of(tracker, "rounds", trials, design={"seeds": {"first": 3, "max": 9, "step": 2}})
    table = report.table("baseline")
    by = rows(report)
    order = list(table.frame["KD method"])
    values = {"response": response, "dist": dist, "fitnet": fitnet}
    expected = dict(zip(order, decide([paired_differences(values[m], none) for m in order], max_seeds=9)))
    for method, want in expected.items():
        row = by[method]
        assert row["seeds paired"] == want.n and row["verdict"] == want.verdict
        assert row["p (anytime)"] == pytest.approx(want.p) and row["p (Holm)"] == pytest.approx(want.p_holm)
        assert (row["difference (anytime) CI low"], row["difference (anytime) CI high"]) == pytest.approx(
            (want.low, want.high)
        )
    assert [by[m]["stopped"] for m in ("response", "dist", "fitnet")] == ["decided", "max reached", "open"]
    assert [by[m]["verdict"] for m in ("response", "dist", "fitnet")] == ["better", "undecided", "undecided"]
    assert by["dist"]["seeds needed"] == expected["dist"].seeds_needed
    assert (
        "p (paired t)" not in table.frame and "Seed rounds, first 3, step 2, max 9 (seeds 0-8):" in table.note
    )
    assert "response is better than no KD" in report.finding
    assert "anytime-valid sequential paired tests (seed rounds up to 9)" in report.finding
    assert "The study cannot decide dist within its max of 9 seeds" in report.finding
    assert "fitnet: still open (below the seed max, undecided)" in report.finding
    # round trials add seeds, not tuning: each method had one tuning trial
    assert set(table.frame["tuning trials KD / none"]) == {"1 / 1"}
    assert "| difference (anytime) [95% CI] |" in md_table(table.frame)


TRIVIAL = 0.48


def _with_trivial(results: dict, trivial: float = TRIVIAL) -> dict:
    return {s: {"test/miou": v, "trivial/test_miou": trivial} for s, v in results.items()}


def test_a_student_at_the_trivial_score_or_a_teacher_no_better_gives_a_warning_not_a_finding(tracker):
    none, kd = Trial({}, _with_trivial(NONE.results)), Trial(RESPONSE.params, _with_trivial(RESPONSE.results))
    report = report_of(tracker, "trivial", [none, kd], teacher={"metrics": {"test/miou": 0.9}})
    frame = report.table("baseline").frame
    assert frame["trivial test mIoU"].iloc[0] == pytest.approx(TRIVIAL)
    none_mean = statistics.fmean(NONE.results.values())
    assert report.finding.startswith(
        f"No finding: the no-KD student scores {none_mean:.4f} test mIoU, within 0.05 of the trivial "
        f"predictor ({TRIVIAL:.4f})"
    )
    assert "is better than" not in report.finding  # the verdict is in the table, not presented as a finding
    assert frame["verdict"].iloc[0] == "better"
    assert "trivial predictor (majority class of the train split for every pixel) test mIoU 0.4800" in (
        report.table("baseline").note
    )
    assert any(line.startswith("Trivial predictor (majority class") for line in report.intro)
    # a healthy student, but a teacher barely above it
    low = _with_trivial(NONE.results, 0.1)
    weak = report_of(
        tracker,
        "weak_teacher",
        [Trial({}, low), Trial(RESPONSE.params, _with_trivial(RESPONSE.results, 0.1))],
        teacher={"metrics": {"test/miou": 0.51}},
    )
    assert weak.finding.startswith(
        f"No finding: the teacher (0.5100 test mIoU) is less than 0.02 above the best no-KD student "
        f"({none_mean:.4f})"
    )
    # older runs without the metric: said, and no warning
    old = report_of(tracker, "no_trivial", [NONE, RESPONSE], teacher={"metrics": {"test/miou": 0.9}})
    assert "trivial predictor (majority class of the train split for every pixel): not recorded" in (
        old.table("baseline").note
    )
    assert old.finding.startswith("response is better than no KD")


def _arm(method: str, phase: str, params: dict, results: dict, lr: float) -> Trial:
    return Trial(
        {**params, "train.lr": lr}, results, search=("train.lr",), tags={"phase": phase, "arm": method}
    )


CONFIRM_SEEDS = (100, 101, 102, 103, 104)
ARMS = {
    "seeds": [0, 1, 2],
    "arms": {"key": "kd.method", "trials": 2},
    "confirm": {"seeds": list(CONFIRM_SEEDS)},
}


def test_a_confirmed_study_is_judged_on_its_confirmation_seeds_alone(tracker):
    tuning_none = {0: 0.50, 1: 0.52, 2: 0.51}
    lucky = {0: 0.62, 1: 0.63, 2: 0.64}  # response's best tuning configuration: a lucky +0.12 on tuning seeds
    conf_none = dict(zip(CONFIRM_SEEDS, [0.50, 0.52, 0.49, 0.51, 0.50]))
    conf_response = shifted(conf_none, [0.004, -0.003, 0.001, -0.002, 0.003])
    trials = [
        _arm("none", "tuning", {}, tuning_none, 0.01),
        _arm("none", "tuning", {}, {0: 0.40, 1: 0.41, 2: 0.42}, 0.1),
        _arm("response", "tuning", RESPONSE.params, lucky, 0.01),
        _arm("response", "tuning", RESPONSE.params, {0: 0.3, 1: 0.31, 2: 0.32}, 0.1),
        _arm("fitnet", "tuning", {"kd.method": "fitnet"}, {0: 0.45, 1: 0.46, 2: 0.44}, 0.01),
        _arm("none", "confirmation", {}, conf_none, 0.01),
        _arm("response", "confirmation", RESPONSE.params, conf_response, 0.01),
    ]
    report = report_of(tracker, "confirmed", trials, design=ARMS)
    by = rows(report)
    d = paired_differences(conf_response, conf_none)
    assert by["response"]["seeds paired"] == 5 and by["response"]["difference"] == pytest.approx(d.mean())
    assert by["response"]["test mIoU KD n"] == 5 and by["response"]["verdict"] == "undecided"
    assert by["fitnet"]["verdict"] == "not confirmed: no confirmation runs of this configuration"
    assert by["fitnet"]["test mIoU KD"] == "not confirmed"
    assert by["response"]["tuning trials KD / none"] == "2 / 2"
    assert (
        "is better" not in report.finding and "fitnet: no confirmation runs, not compared." in report.finding
    )
    # the method table is about tuning: response's lucky tuning seeds, not its confirmation
    methods = report.table("methods").frame.set_index("KD method")
    assert methods.loc["response", "test mIoU n"] == 3
    arms = report.table("arms").frame.set_index("KD method")
    assert dict(arms["tuning trials"]) == {"none": 2, "fitnet": 1, "response": 2}
    assert arms.loc["response", "test mIoU (tuning seeds)"] == pytest.approx(statistics.fmean(lucky.values()))
    assert arms.loc["response", "val/miou (tuning)"] == pytest.approx(statistics.fmean(lucky.values()))
    assert arms.loc["response", "test mIoU (confirmation seeds)"] == pytest.approx(
        statistics.fmean(conf_response.values())
    )
    assert arms.loc["response", "test mIoU (confirmation seeds) n"] == 5
    assert arms.loc["fitnet", "test mIoU (confirmation seeds)"] == "not confirmed"
    note = report.table("arms").note
    assert "Unequal tuning: fitnet 1 tuning trials against 2 for none, response" in note
    assert "(the study gives each arm 2)" in note
    study = load_study(tracker, "confirmed")
    assert len(study.trials) == 5 and len(study.confirmation.trials) == 2


def test_a_study_yaml_the_report_cannot_read_is_one_line(tracker, capsys, tmp_path):
    from harness.report.__main__ import main as report_main

    log_study(tracker, "bad_margin", [NONE, RESPONSE], design={**FIVE, "min_effect": -1})
    code = report_main(["--study", "bad_margin", "--tracking-uri", tracker.uri, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: study bad_margin: study.yaml min_effect: -1 must be a positive number")


def test_the_confirmed_configuration_is_the_arms_whichever_the_sweep_chose(tracker):
    """The sweep confirmed response at lr 0.1 (its own choice); the report judges that configuration and
    shows its tuning beside it, not the lr it would have chosen itself."""
    conf_none = dict(zip(CONFIRM_SEEDS, [0.50, 0.52, 0.49, 0.51, 0.50]))
    conf_response = shifted(conf_none, [0.05, 0.06, 0.05, 0.06, 0.06])
    trials = [
        _arm("none", "tuning", {}, {0: 0.50, 1: 0.52, 2: 0.51}, 0.01),
        _arm("response", "tuning", RESPONSE.params, {0: 0.62, 1: 0.63, 2: 0.64}, 0.01),
        _arm("response", "tuning", RESPONSE.params, {0: 0.55, 1: 0.56, 2: 0.57}, 0.1),
        _arm("none", "confirmation", {}, conf_none, 0.01),
        _arm("response", "confirmation", RESPONSE.params, conf_response, 0.1),
    ]
    report = report_of(tracker, "confirmed_other", trials, design=ARMS)
    row = rows(report)["response"]
    assert row["seeds paired"] == 5 and row["verdict"] == "better"
    assert row["difference"] == pytest.approx(paired_differences(conf_response, conf_none).mean())
    arms = report.table("arms").frame.set_index("KD method")
    assert arms.loc["response", "best tuning trial #"] == "2"  # the lr 0.1 trial the sweep confirmed
    assert arms.loc["response", "test mIoU (tuning seeds)"] == pytest.approx(0.56)


def test_the_design_is_read_as_the_sweep_dumps_the_study_file():
    from harness.report.decisive import plan_of
    from harness.report.design import Rounds, design_of

    tree = {
        "seeds": [0, 1, 2],
        "min_effect": 0.01,
        "arms": {"key": "kd.method", "trials": 8},
        "confirm": {"seeds": {"first": 3, "max": 20, "step": 2, "start": 100}},
    }
    design = design_of(tree)
    assert design.seeds == [0, 1, 2] and design.rounds == Rounds(3, 20, 2, 100)
    plan = plan_of(design)
    assert plan.sequential and plan.max_seeds == 20 and plan.min_effect == 0.01
    assert not plan_of(design_of({"seeds": [0, 1, 2, 3, 4], "min_effect": None})).sequential
    assert design_of(None, "[0, 1, 2]").seeds == [0, 1, 2]  # a parent run without study.yaml
