"""The report's rows on small real MLflow stores written run by run (no training): pruned configurations,
the baseline's schedule, seed runs of two trials with the same number, ms/image keys, temperature tables,
the finding's counts, gap closed and the teacher's provenance.

Each study is logged the way the sweep logs one: a parent run (role=study), one run per trial (role=trial,
its flat config as params, search.* for the searched keys) and one child run per seed (role=seed)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import pytest

from harness.report.build import analyse
from harness.report.compare import finding
from harness.report.groups import build_groups, group_seeds
from harness.report.load import load_study
from harness.report.markdown import md_table
from harness.tracking import Tracker
from tests.test_report import _rows

BASE = {
    "kd.method": "none",
    "model.name": "unet",
    "model.width": 2,
    "data.source": "digits_seg",
    "data.image_size": 32,
    "train.epochs": 2,
    "train.lr": 0.01,
    "train.optimizer": "adam",
    "train.batch_size": 16,
    "train.device": "cpu",
}
SEEDS = (0, 1, 2, 3, 4)


@dataclass
class Trial:
    """One trial: config values over BASE, and per seed its test mIoU (val/miou is the same number), a
    state ("diverged", "pruned") or a dict of metrics and ``tags.*``."""

    params: dict
    results: dict
    state: str = "finished"
    search: tuple = ()
    number: int | None = None
    tags: dict = field(default_factory=dict)  # the trial run's tags: phase, arm


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('rows') / 'mlflow.db'}")


def _seed_values(result) -> tuple[str, dict, dict]:
    if isinstance(result, str):
        return result, {}, {}
    values = result if isinstance(result, dict) else {"test/miou": result}
    metrics = {"val/miou": values.get("test/miou"), "ms_per_image": 1.0, "params": 1000.0}
    metrics |= {k: v for k, v in values.items() if not k.startswith("tags.")}
    tags = {k.removeprefix("tags."): v for k, v in values.items() if k.startswith("tags.")}
    return "finished", metrics, tags


def _aggregate(results: list[dict], keys: tuple[str, ...]) -> dict:
    """What a trial run logs: each metric's mean over its finished seeds, with ``<metric>_std``."""
    out = {}
    for key in keys:
        values = [r[key] for r in results]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def log_study(
    tracker: Tracker, name: str, trials: list[Trial], teacher: dict | None = None, design: dict | None = None
) -> None:
    """``design``: the study file's seeds, min_effect, arms and confirm, logged as the sweep does (the
    parent's study.yaml); without it the parent has no study.yaml (as before the sweep wrote one)."""
    parent = tracker.start_run(name, f"study-{name}", tags={"role": "study", "optuna.study": name})
    seeds = (design or {}).get("seeds", list(SEEDS))
    parent.log_params({"objective": "maximize val/miou", "seeds": seeds})
    if design is not None:
        parent.log_yaml({"name": name, "seeds": seeds, **design}, "study.yaml")
    teacher_tags = {}
    if teacher:
        run = tracker.start_run("teachers", "teacher", tags={"role": "teacher"})
        run.log_metrics(teacher.pop("metrics"))
        run.end("finished")
        teacher_tags = {"teacher.source": f"run {run.id} (teacher.yaml)", **teacher}
    for i, spec in enumerate(trials):
        number = i if spec.number is None else spec.number
        config = {**BASE, **spec.params}
        tags = {"optuna.study": name, "optuna.trial": number}
        trial = tracker.start_run(name, f"trial-{number}", parent.id, {**tags, **spec.tags, "role": "trial"})
        trial.log_params({**config, **{f"search.{k}": config[k] for k in spec.search}, "seeds": list(SEEDS)})
        finished = []
        for seed, result in spec.results.items():
            state, metrics, extra = _seed_values(result)
            run = tracker.start_run(
                name,
                f"trial-{number}-seed-{seed}",
                trial.id,
                {**tags, "role": "seed", "seed": seed, **teacher_tags, **extra},
            )
            run.log_params({**config, "train.seed": seed})
            run.log_metrics(metrics)
            run.end(state)
            finished += [metrics] if state == "finished" else []
        if spec.state != "pruned" and finished:  # a pruned trial logs no summary
            trial.log_metrics({"n_seeds": len(finished), **_aggregate(finished, ("val/miou", "test/miou"))})
        trial.end(spec.state)


def report_of(tracker, name, trials, **kw):
    log_study(tracker, name, trials, **kw)
    return analyse(tracker, name)


def five(*values) -> dict:
    return dict(zip(SEEDS, values))


NONE = Trial({}, five(0.50, 0.52, 0.49, 0.51, 0.50))
RESPONSE = Trial({"kd.method": "response", "kd.temperature": 4.0}, five(0.55, 0.58, 0.54, 0.57, 0.56))


def test_pruned_configurations_are_rows_marked_and_counted(tracker):
    report = report_of(
        tracker,
        "pruned",
        [
            NONE,
            RESPONSE,
            # response at lr 0.1 scored best on val but was pruned after two seeds: never chosen over lr 0.01
            Trial(
                {"kd.method": "response", "kd.temperature": 4.0, "train.lr": 0.1}, five(0.9, 0.9), "pruned"
            ),
            Trial({"kd.method": "fitnet"}, five(0.40, 0.42), "pruned"),
        ],
    )
    methods = report.table("methods").frame.set_index("KD method")
    assert list(methods.index) == ["none", "fitnet", "response"]
    assert methods.loc["fitnet", "test mIoU"] == pytest.approx(0.41)  # its mean so far, over two seeds
    assert methods.loc["fitnet", "test mIoU n"] == 2 and methods.loc["fitnet", "test mIoU pruned"]
    assert methods.loc["response", "trial #"] == "1" and not methods.loc["response", "test mIoU pruned"]
    assert "| fitnet | 0.4100 ± 0.0141 (n=2, pruned) |" in md_table(methods.reset_index())
    base = report.table("baseline")
    rows = base.frame.set_index("KD method")
    assert rows.loc["fitnet", "verdict"] == "pruned after 2 finished seeds: not compared"
    assert np.isnan(rows.loc["fitnet", "difference"]) and rows.loc["response", "seeds paired"] == 5
    assert "Pruned:" in base.note
    assert report.finding.endswith(
        " 1 method pruned by the study's pruner, not compared: fitnet (after 2 finished seeds)."
    )


def test_a_pruned_baseline_is_named_not_missing(tracker):
    for name, none in (
        ("pruned_none", Trial({}, five(0.5, 0.52), "pruned")),  # Wilcoxon: stopped after two seeds
        ("pruned_none_epoch", Trial({}, {0: "pruned"}, "pruned")),  # one seed, stopped at an epoch
    ):
        report = report_of(tracker, name, [none, RESPONSE])
        row = report.table("baseline").frame.iloc[0]
        assert row["verdict"] == "baseline pruned (none, trial 0): not compared", name
        assert np.isnan(row["difference"])
        assert report.finding.startswith(
            "No KD method can be judged: the no-KD baseline was pruned (trial 0)"
        ), name
    cell = report.table("baseline").frame.iloc[0]
    assert cell["test mIoU none"] == "Pruned" and cell["test mIoU none n"] == 0


def test_the_baseline_matches_fixed_training_keys_and_lists_searched_ones(tracker):
    # batch size is fixed by the study (not searched): a none run at another batch size is no baseline
    report = report_of(tracker, "fixed_batch", [Trial({"train.batch_size": 32}, NONE.results), RESPONSE])
    row = report.table("baseline").frame.iloc[0]
    assert row["verdict"] == "no baseline: no `none` run with this student and fixed training settings"
    # lr is searched for both arms: each keeps its best lr, and the note lists the difference
    lr = ("train.lr",)
    report = report_of(
        tracker,
        "searched_lr",
        [
            Trial({"train.lr": 0.001}, five(0.52, 0.53, 0.51, 0.52, 0.52), search=lr),
            Trial({"train.lr": 0.01}, NONE.results, search=lr),
            Trial({**RESPONSE.params, "train.lr": 0.01}, RESPONSE.results, search=lr),
        ],
    )
    base = report.table("baseline")
    row = base.frame.iloc[0]
    assert row["trial # KD / none"] == "2 / 0" and row["seeds paired"] == 5
    assert "response: lr 0.01 (none 0.001)" in base.note
    assert "Training settings the study searched (lr) may differ: each arm keeps its best value" in base.note
    # train.iterations is how long, like epochs: matched even when searched (a longer none is no baseline)
    its = ("train.iterations",)
    report = report_of(
        tracker,
        "searched_iterations",
        [
            Trial({"train.iterations": 200}, five(0.70, 0.71, 0.69, 0.70, 0.70), search=its),
            Trial({"train.iterations": 100}, NONE.results, search=its),
            Trial({**RESPONSE.params, "train.iterations": 100}, RESPONSE.results, search=its),
        ],
    )
    assert report.table("baseline").frame.iloc[0]["trial # KD / none"] == "2 / 1"


def test_seed_runs_follow_their_trial_run_not_its_number(tracker):
    """A reset journal numbers trials from 0 again: two trial-0 runs, two configurations."""
    log_study(tracker, "reset", [NONE, Trial(RESPONSE.params, RESPONSE.results, number=0)])
    study = load_study(tracker, "reset")
    groups = build_groups(study)
    seeds = group_seeds(study, groups)
    method_of = dict(zip(groups["group"], groups["method"]))
    assert [method_of[g] for g in seeds["group"]] == list(seeds["method"])
    assert seeds.groupby("group").size().tolist() == [5, 5]
    row = analyse(tracker, "reset").table("baseline").frame.iloc[0]
    assert row["seeds paired"] == 5 and row["difference"] == pytest.approx(0.056)


def _ms(value: float, **tags) -> dict:
    return {"test/miou": 0.5, "ms_per_image": value, **{f"tags.{k}": v for k, v in tags.items()}}


def test_ms_per_image_is_keyed_on_what_was_timed(tracker):
    timing = "cpu, 1 thread, 1x1x32x32, float32, contiguous"
    # resumed under another OMP_NUM_THREADS: the device tag differs, the timing does not -> one figure
    none = Trial({}, {s: _ms(1.0 + s, device="cpu (4 threads)", timing=timing) for s in SEEDS})
    kd = Trial(RESPONSE.params, {s: _ms(3.0 + s, device="cpu (1 threads)", timing=timing) for s in SEEDS})
    ms = report_of(tracker, "timing_same", [none, kd]).table("methods").frame["ms/image"]
    assert list(ms) == [pytest.approx(4.0)] * 2  # the median over all ten runs
    # same device, but the KD runs were timed under bf16 autocast: two figures
    none = Trial({}, {s: _ms(1.0 + s, device="cpu", timing=timing) for s in SEEDS})
    kd_bf16 = Trial(RESPONSE.params, {s: _ms(3.0 + s, device="cpu", timing="bf16 autocast") for s in SEEDS})
    ms = report_of(tracker, "timing_differs", [none, kd_bf16]).table("methods").frame["ms/image"]
    assert list(ms) == [pytest.approx(3.0), pytest.approx(5.0)]
    # older runs without a timing tag: keyed on the device as before
    old_none = Trial({}, {s: _ms(1.0 + s, device="cpu (4 threads)") for s in SEEDS})
    old_kd = Trial(RESPONSE.params, {s: _ms(3.0 + s, device="cpu (1 threads)") for s in SEEDS})
    ms = report_of(tracker, "timing_untagged", [old_none, old_kd]).table("methods").frame["ms/image"]
    assert list(ms) == [pytest.approx(3.0), pytest.approx(5.0)]


def test_temperature_tables_only_when_one_method_varies_its_temperature(tracker):
    # the methods study: each method at its own default temperature
    defaults = [
        NONE,
        Trial({"kd.method": "dist", "kd.tau": 1.0}, NONE.results),
        Trial({"kd.method": "cwd", "kd.tau": 4.0}, NONE.results),
        RESPONSE,
    ]
    report = report_of(tracker, "default_temperatures", defaults)
    assert report.table("temperatures") is None and report.table("seeds_per_temperature") is None
    varied = [*defaults, Trial({"kd.method": "response", "kd.temperature": 1.0}, NONE.results)]
    table = report_of(tracker, "varied_temperature", varied).table("temperatures")
    assert list(table.frame["T"]) == [1.0, 4.0]  # response's two temperatures; dist and cwd stay out


def test_finding_counts_only_the_tested_methods():
    rows = _rows(
        {
            "cwd": [0.05, 0.06, 0.04, 0.055, 0.045],
            "dist": [0.01, -0.02, 0.015, 0.0, -0.01],
            "flat": [0.02] * 5,  # zero spread: no t-test, not in the Holm family
        }
    )
    text = finding(rows, "test mIoU")
    assert "(n=5 seeds; Holm-corrected paired t-tests over 2 methods)" in text
    assert "; the other method does not differ from no KD" in text  # dist
    assert text.endswith(" 1 more method with the same difference on every seed (zero spread) not tested.")


def test_gap_closed_uses_the_paired_seeds_and_the_teacher_says_where_it_was_found(tracker):
    kd = Trial(RESPONSE.params, {0: 0.60, 1: 0.62, 2: 0.61, 3: "diverged", 4: "diverged"})
    none = Trial({}, five(0.50, 0.52, 0.51, 0.30, 0.30))
    teacher = {"metrics": {"test/miou": 0.90}, "teacher.found_in": "teachers"}
    report = report_of(tracker, "gap", [none, kd], teacher=teacher)
    row = report.table("baseline").frame.iloc[0]
    paired_none = statistics.fmean([0.50, 0.52, 0.51])
    assert row["difference"] == pytest.approx(0.10)
    assert row["gap closed %"] == pytest.approx(100 * 0.10 / (0.90 - paired_none))
    assert "teacher teacher (found in teachers) test mIoU 0.9000" in report.table("baseline").note
    assert "found in teachers" in report.intro[2]


def test_notes_say_which_metric_chose_the_epoch(tracker):
    report = report_of(tracker, "select_default", [NONE, RESPONSE])
    for table in ("methods", "baseline"):
        assert "Each seed's model is its epoch with the best `val/miou`" in report.table(table).note
    loss = {"train.select_on": "val/loss"}
    report = report_of(
        tracker,
        "select_loss",
        [Trial(loss, NONE.results), Trial({**RESPONSE.params, **loss}, RESPONSE.results)],
    )
    for table in ("methods", "baseline"):
        assert "Each seed's model is its epoch with the best `val/loss`" in report.table(table).note
    mixed = report_of(tracker, "select_mixed", [NONE, Trial({**RESPONSE.params, **loss}, RESPONSE.results)])
    assert (
        "Each seed's model is its epoch with the best validation metric (train.select_on): "
        "`val/miou` for none; `val/loss` for response." in mixed.table("methods").note
    )
    # select_on is fixed by the study (not searched): a none run that selected on another metric is no baseline
    assert mixed.table("baseline").frame["verdict"].iloc[0].startswith("no baseline")


def test_a_seed_rerun_after_the_seeds_grew_counts_once(tracker):
    """seeds [0, 1, 2] then [0..4]: the configuration's second trial run re-trains seeds 0-2. Each seed is
    one replicate: the later finished run, never both."""
    first = Trial({}, {0: 0.10, 1: 0.12, 2: 0.11})  # the runs of the earlier study file
    rerun = Trial({}, five(0.50, 0.52, 0.49, 0.51, 0.50))
    report = report_of(tracker, "seeds_grew", [first, rerun, RESPONSE])
    none = report.groups[report.groups["method"] == "none"].iloc[0]
    assert none["seeds_finished"] == 5 and none["test/miou n"] == 5
    assert none["test/miou"] == pytest.approx(statistics.fmean(NONE.results.values()))
    assert none["objective"] == pytest.approx(none["val/miou"])
    row = report.table("baseline").frame.iloc[0]
    assert row["seeds paired"] == 5 and row["difference"] == pytest.approx(0.056)
    study = load_study(tracker, "seeds_grew")
    seeds = group_seeds(study, build_groups(study))
    assert not seeds.duplicated(["group", "seed"]).any()
