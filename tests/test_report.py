"""``python -m harness.report`` on a real store: three tiny real sweeps (a kd.method x width grid with two
seeds, a temperature grid where some learning rates diverge, a classification study), then the tables'
rows, columns and values are checked against the runs read directly with MlflowClient."""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats as sps

from harness.cli import main as harness_main
from harness.report.__main__ import main as report_main
from harness.report.across import summary_table
from harness.report.build import StudyReport
from harness.report.compare import baseline_table, finding
from harness.report.groups import build_groups, group_seeds
from harness.report.load import StudyRuns
from harness.report.markdown import md_table
from harness.report.stats import TOO_FEW, compare_table, pareto_front
from harness.report.tables import best_trials_table, method_table
from harness.tracking import Tracker
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml

SEG_TEACHER = {
    "name": "tiny_teacher",
    "data": TINY_DATA,
    "model": {"name": "unet", "width": 4, "depth": 3},
    "train": TINY_TRAIN,
}
CLS_DATA = {"source": "digits", "seed": 0}
CLS_TRAIN = {"epochs": 2, "batch_size": 64, "lr": 0.01, "seed": 0}


def _studies(root: Path) -> list[Path]:
    teacher = write_yaml(root / "experiments" / "teacher.yaml", SEG_TEACHER)
    student = write_yaml(
        root / "experiments" / "student.yaml",
        {
            **SEG_TEACHER,
            "name": "tiny_student",
            "model": {"name": "unet", "width": 2, "depth": 3},
            "teacher": str(teacher),
        },
    )
    cls_teacher = write_yaml(
        root / "experiments" / "cls_teacher.yaml",
        {
            "name": "cls_teacher",
            "data": CLS_DATA,
            "model": {"name": "mlp", "hidden": [32], "input_size": 8},
            "train": CLS_TRAIN,
        },
    )
    cls_student = write_yaml(
        root / "experiments" / "cls_student.yaml",
        {
            "name": "cls_student",
            "data": CLS_DATA,
            "model": {"name": "mlp", "hidden": [8], "input_size": 8},
            "train": CLS_TRAIN,
            "teacher": str(cls_teacher),
        },
    )
    seg = {
        "experiment": str(student),
        "teacher": str(teacher),
        "objective": {"metric": "val/miou", "direction": "maximize"},
    }
    return [
        write_yaml(
            root / "studies" / "kdgrid.yaml",
            {
                **seg,
                "budget": {"trials": 4},
                "sampler": {"name": "grid", "seed": 0},
                "seeds": [0, 1],
                "search": {
                    "kd.method": {"choices": ["none", "response"]},
                    "model.width": {"choices": [2, 4]},
                },
            },
        ),
        # sgd at lr 1e30 turns the loss infinite in the first epoch: those trials diverge on every seed. The
        # grid runs in order, so the three trials are (1, 1e30), (1, 0.01), (4, 1e30).
        write_yaml(
            root / "studies" / "temps.yaml",
            {
                **seg,
                "budget": {"trials": 3},
                "sampler": {"name": "grid", "seed": 0},
                "seeds": [0, 1],
                "fixed": {"kd.method": "response", "train.optimizer": "sgd"},
                "search": {
                    "kd.temperature": {"choices": [1.0, 4.0]},
                    "train.lr": {"choices": [1.0e30, 0.01]},
                },
            },
        ),
        write_yaml(
            root / "studies" / "cls.yaml",
            {
                "experiment": str(cls_student),
                "teacher": str(cls_teacher),
                "budget": {"trials": 2},
                "objective": {"metric": "val/accuracy", "direction": "maximize"},
                "sampler": {"name": "grid", "seed": 0},
                "seeds": [0],
                "search": {"kd.method": {"choices": ["none", "response"]}},
            },
        ),
    ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster on a busy 2-core machine
    try:
        for study in _studies(root):
            storage = str(root / "journal.log")
            assert (
                harness_main(
                    ["sweep", "--study", str(study), "--storage", storage, "--tracking-uri", uri, "--quiet"]
                )
                == 0
            )
    finally:
        torch.set_num_threads(threads)
    # a study whose sweep has not finished a trial yet: its parent run only
    Tracker(uri).start_run("empty", "study-empty", tags={"role": "study", "optuna.study": "empty"})
    out = root / "reports"
    code = report_main(["--study", "all", "--out", str(out), "--tracking-uri", uri])
    return SimpleNamespace(root=root, uri=uri, out=out, code=code, client=MlflowClient(uri))


def runs(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    by_role: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        by_role.setdefault(run.data.tags.get("role"), []).append(run)
    return by_role


def seed_runs(client, experiment: str, **params) -> list:
    """Seed runs of the trials whose params equal ``params`` (values compared as MLflow's strings)."""
    by_role = runs(client, experiment)
    trial_ids = {
        t.info.run_id
        for t in by_role["trial"]
        if all(t.data.params.get(k) == str(v) for k, v in params.items())
    }
    return [s for s in by_role["seed"] if s.data.tags["mlflow.parentRunId"] in trial_ids]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def finished_metric(seeds: list, metric: str) -> list[float]:
    return [s.data.metrics[metric] for s in seeds if s.data.tags["state"] == "finished"]


def read(swept, study: str, table: str) -> pd.DataFrame:
    return pd.read_csv(swept.out / study / f"{table}.csv")


def test_report_runs_and_writes_every_study(swept):
    assert swept.code == 0
    for study in ("kdgrid", "temps", "cls", "all"):
        assert (swept.out / study / "README.md").stat().st_size > 500
    assert not (swept.out / "empty").exists()  # skipped with a message, not a traceback
    summary = read(swept, "all", "summary")
    assert sorted(summary["study"]) == ["cls", "kdgrid", "temps"]
    assert dict(zip(summary["study"], summary["trials diverged"])) == {"cls": 0, "kdgrid": 0, "temps": 2}


def test_tables_follow_what_each_study_varies(swept):
    files = {s: {p.name for p in (swept.out / s).iterdir()} for s in ("kdgrid", "temps", "cls")}
    assert {"methods.csv", "widths.csv", "baseline.csv", "best_trials.csv", "importances.csv"} <= files[
        "kdgrid"
    ]
    assert not {"temperatures.csv", "seeds_per_temperature.csv", "classification.csv"} & files["kdgrid"]
    assert {"temperatures.csv", "seeds_per_temperature.csv"} <= files["temps"]
    assert not {"widths.csv", "methods.csv", "classification.csv"} & files["temps"]
    assert {"classification.csv", "methods.csv"} <= files["cls"] and "widths.csv" not in files["cls"]
    for study in files:
        assert {p.removesuffix(".csv") for p in files[study] if p.endswith(".csv")} == {
            p.removesuffix(".md") for p in files[study] if p.endswith(".md") and p != "README.md"
        }


def test_method_table_matches_the_seed_runs(swept):
    table = read(swept, "kdgrid", "methods")
    assert list(table.columns[:5]) == ["KD method", "k", "test mIoU", "test mIoU std", "test mIoU n"]
    assert {"# parameters", "ms/image", "training ms/image", "training ms/image std", "tuning trials"} <= set(
        table.columns
    )
    assert "ms/image std" not in table and set(table["schedule"]) == {
        "2 ep, adam, lr 0.01, constant, batch 16"
    }
    assert list(zip(table["KD method"], table["k"])) == [
        ("none", 2),
        ("none", 4),
        ("response", 2),
        ("response", 4),
    ]
    for _, row in table.iterrows():
        seeds = seed_runs(swept.client, "kdgrid", **{"kd.method": row["KD method"], "model.width": row["k"]})
        assert sorted(s.data.tags["seed"] for s in seeds) == ["0", "1"]
        mean, std = mean_std(finished_metric(seeds, "test/miou"))
        assert row["test mIoU"] == pytest.approx(mean) and row["test mIoU std"] == pytest.approx(std)
        assert row["test mIoU n"] == 2 and row["test mIoU div."] == 0 and row["test mIoU failed"] == 0
        assert row["# parameters"] == seeds[0].data.metrics["params"]
        assert row["tuning trials"] == 1  # a grid: one trial per method and width
        # ms/image belongs to the student: the median over every seed run with this width, KD or not
        same_student = seed_runs(swept.client, "kdgrid", **{"model.width": row["k"]})
        assert row["ms/image"] == pytest.approx(
            statistics.median(finished_metric(same_student, "ms_per_image"))
        )
    assert table.groupby("k")["ms/image"].nunique().eq(1).all()


def test_width_table_matches_the_seed_runs(swept):
    table = read(swept, "kdgrid", "widths")
    assert list(table["k"]) == [4, 4, 2, 2]  # widest first, as in seed 002's Table 1
    for _, row in table.iterrows():
        seeds = seed_runs(swept.client, "kdgrid", **{"kd.method": row["KD method"], "model.width": row["k"]})
        for column, metric in (
            ("test loss", "test/loss"),
            ("train loss", "train/loss_best_epoch"),
            ("best epoch", "best_epoch"),
            ("test mIoU", "test/miou"),
        ):
            mean, std = mean_std(finished_metric(seeds, metric))
            assert row[column] == pytest.approx(mean) and row[f"{column} std"] == pytest.approx(
                std, nan_ok=True
            )
        assert row["parameters"] == seeds[0].data.metrics["params"]


def test_baseline_difference_interval_and_finding(swept):
    table = read(swept, "kdgrid", "baseline")
    assert list(table["k"]) == [2, 4] and set(table["KD method"]) == {"response"}
    for _, row in table.iterrows():
        kd = {
            s.data.tags["seed"]: s.data.metrics["test/miou"]
            for s in seed_runs(swept.client, "kdgrid", **{"kd.method": "response", "model.width": row["k"]})
        }
        none = {
            s.data.tags["seed"]: s.data.metrics["test/miou"]
            for s in seed_runs(swept.client, "kdgrid", **{"kd.method": "none", "model.width": row["k"]})
        }
        d = [kd[s] - none[s] for s in sorted(kd)]
        assert row["difference"] == pytest.approx(statistics.fmean(d)) and row["seeds paired"] == 2
        if len(set(d)) > 1:  # two seeds: a t-interval with df = 1, and the paired t-test's p
            low, high = sps.t.interval(0.95, 1, loc=statistics.fmean(d), scale=sps.sem(d))
            assert (row["difference CI low"], row["difference CI high"]) == pytest.approx((low, high))
            assert row["p (paired t)"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue)  # = paired t
        assert row["p (sign-flip)"] == pytest.approx(0.5 if d[0] * d[1] > 0 else 1.0)
        assert np.isnan(row["p (Holm)"]) and row["verdict"] == TOO_FEW  # below 3 seeds: no verdict
    readme = (swept.out / "kdgrid" / "README.md").read_text()
    # two epochs of a k=2 student: at the trivial predictor's score, so the finding warns instead
    none_runs = seed_runs(swept.client, "kdgrid", **{"kd.method": "none", "model.width": 2})
    trivial = statistics.median(finished_metric(none_runs, "trivial/test_miou"))
    assert table.loc[table["k"] == 2, "trivial test mIoU"].iloc[0] == pytest.approx(trivial)
    none_mean = statistics.fmean(finished_metric(none_runs, "test/miou"))
    assert none_mean - trivial <= 0.05
    close = "no better than" if none_mean <= trivial else "within 0.05 of"
    assert readme.startswith(
        f"# Study kdgrid\n\n**Finding: No finding: the no-KD student (k=2) scores {none_mean:.4f} test mIoU, "
        f"{close} the trivial predictor ({trivial:.4f}): the student has hardly learned the task"
    )
    assert "the sign-flip p cannot reach 0.05" in readme
    cls = read(swept, "cls", "baseline")  # one seed: no interval, said plainly
    assert cls["verdict"].iloc[0] == TOO_FEW and np.isnan(cls["difference CI low"].iloc[0])
    assert "Too few seeds to tell" in (swept.out / "cls" / "README.md").read_text()


def test_temperature_tables_mark_diverged_runs(swept):
    by_role = runs(swept.client, "temps")
    temps = read(swept, "temps", "temperatures")
    tried = sorted({float(t.data.params["kd.temperature"]) for t in by_role["trial"]})
    assert list(temps["T"]) == tried
    for _, row in temps.iterrows():
        seeds = seed_runs(swept.client, "temps", **{"kd.temperature": row["T"]})
        done = [s for s in seeds if s.data.tags["state"] == "finished"]
        if done:  # only the lr 0.01 trial finishes
            assert float(row["test loss"]) == pytest.approx(
                statistics.fmean(s.data.metrics["test/loss"] for s in done)
            )
            assert row["test mIoU n"] == len(done) and row["test mIoU div."] == 0
        else:
            assert row["test loss"] == "Div." and row["test mIoU"] == "Div." and row["test mIoU n"] == 0
            assert row["test mIoU div."] == len(seeds) == 2  # the diverged seeds are counted, not dropped
    per_seed = read(swept, "temps", "seeds_per_temperature")
    assert list(per_seed.columns[:4]) == ["T", "lr", "seed 0", "seed 1"]
    assert len(per_seed) == len(by_role["trial"]) == 3
    diverged = 0
    for _, row in per_seed.iterrows():
        for seed in (0, 1):
            (run,) = [
                s
                for s in seed_runs(
                    swept.client, "temps", **{"kd.temperature": row["T"], "train.lr": row["lr"]}
                )
                if s.data.tags["seed"] == str(seed)
            ]
            if run.data.tags["state"] == "diverged":
                diverged += 1
                assert row[f"seed {seed}"] == "Div." and "failure" in run.data.tags
            else:
                assert float(row[f"seed {seed}"]) == pytest.approx(run.data.metrics["test/loss"])
    assert diverged == 4
    assert list(per_seed["test loss div."]) == [0 if lr < 1 else 2 for lr in per_seed["lr"]]
    readme = (swept.out / "temps" / "README.md").read_text()
    assert "| Div. | Div. | Div. (n=0, 2 div.) |" in readme  # seeds per temperature: the counts cell
    assert "| 4 | Div. (n=0, 2 div.) | Div. (n=0, 2 div.) |" in readme  # temperature table


def test_classification_table(swept):
    table = read(swept, "cls", "classification")
    assert list(table.columns[:4]) == ["dataset", "loss used", "test loss", "test loss std"]
    assert list(table["loss used"]) == ["none: ce", "response: ce + kd"]
    for _, row in table.iterrows():
        seeds = seed_runs(swept.client, "cls", **{"kd.method": row["loss used"].split(":")[0]})
        assert row["dataset"] == "digits"
        assert row["test accuracy"] == pytest.approx(seeds[0].data.metrics["test/accuracy"])
        assert row["test accuracy n"] == 1 and np.isnan(row["test accuracy std"])


def test_best_trials_and_importances(swept):
    by_role = runs(swept.client, "kdgrid")
    trials = sorted(by_role["trial"], key=lambda t: -t.data.metrics["val/miou"])
    best = read(swept, "kdgrid", "best_trials")
    assert list(best["trial"]) == [int(t.data.tags["optuna.trial"]) for t in trials]
    assert best["val/miou"].tolist() == pytest.approx([t.data.metrics["val/miou"] for t in trials])
    (parent,) = by_role["study"]
    recorded = {
        k.removeprefix("importance/"): v
        for k, v in parent.data.metrics.items()
        if k.startswith("importance/")
    }
    imp = read(swept, "kdgrid", "importances")
    assert dict(zip(imp["parameter"], imp["importance"])) == pytest.approx(recorded)


def test_plots_are_written_and_logged_on_the_parent_run(swept):
    expected = {
        "kdgrid": {"pareto", "width", "loss_curves"},
        "temps": {"pareto", "temperature", "loss_curves"},
        "cls": {"pareto", "loss_curves"},
        "all": {"pareto"},
    }
    for study, names in expected.items():
        pngs = {p.stem: p for p in (swept.out / study).glob("*.png")}
        assert set(pngs) == names
        for png in pngs.values():
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (parent,) = runs(swept.client, "kdgrid")["study"]
    logged = {Path(a.path).name for a in swept.client.list_artifacts(parent.info.run_id, "report")}
    assert {"README.md", "methods.csv", "methods.md", "pareto.png", "width.png"} <= logged


def test_unknown_and_empty_studies_give_one_line(swept, capsys):
    assert report_main(["--study", "nope", "--tracking-uri", swept.uri, "--out", str(swept.root / "r2")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: no study named nope in ") and "known studies: cls, empty, kdgrid, temps" in err
    )
    assert "Traceback" not in err and err.count("\n") == 1
    assert (
        report_main(["--study", "empty", "--tracking-uri", swept.uri, "--out", str(swept.root / "r2")]) == 1
    )
    assert "study empty has no finished trials yet" in capsys.readouterr().err
    missing = f"sqlite:///{swept.root / 'nowhere' / 'mlflow.db'}"
    assert report_main(["--study", "all", "--tracking-uri", missing]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (swept.root / "nowhere").exists()


def test_markdown_merges_mean_std_and_n():
    frame = pd.DataFrame(
        {
            "KD method": ["none", "cwd|x"],
            "mIoU": [0.1234, 0.2],
            "mIoU std": [0.01, np.nan],
            "mIoU n": [3, 1],
            "params": [2349141, 2349141],
            "loss": ["Div.", 0.5],
        }
    )
    lines = md_table(frame).splitlines()
    assert lines[0] == "| KD method | mIoU (mean ± std, n) | params | loss |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2] == "| none | 0.1234 ± 0.0100 (n=3) | 2,349,141 | Div. |"
    assert lines[3] == "| cwd\\|x | 0.2000 (n=1) | 2,349,141 | 0.5000 |"


def test_pareto():
    assert pareto_front([1, 2, 3, 3], [0.1, 0.3, 0.2, np.nan]).tolist() == [True, True, False, False]


def _rows(spec: dict[str, list[float]]) -> list:
    """(name, judged comparison) rows of one table from each method's seed-paired differences."""
    pairs = [(dict(enumerate(d)), dict.fromkeys(range(len(d)), 0.0)) for d in spec.values()]
    return list(zip(spec, compare_table(pairs)))


def test_finding_follows_the_holm_verdicts():
    readme_cwd = [0.0001, 0.0155, 0.0534]  # README's cwd - none: all positive, yet undecided
    text = finding(_rows({"cwd": readme_cwd, "fitnet": [-0.02, -0.045, -0.005]}), "test mIoU")
    assert text == (
        "No KD method differs from training without KD beyond seed noise "
        "(n=3 seeds; Holm-corrected paired t-tests over 2 methods)."
    )
    rows = _rows({"cwd": [0.05, 0.06, 0.04, 0.055, 0.045], "pairwise": [0.01, -0.02, 0.015, 0.0, -0.01]})
    text = finding(rows, "test mIoU")
    # mean 0.05, sd 0.0079, se 0.0035, t quantile at df = 4: 2.776 -> half-width 0.0098
    assert text.startswith("cwd is better than no KD: +0.0500 [+0.0402, +0.0598] test mIoU, Holm p = 0.0003;")
    assert "; the other method does not differ from no KD beyond seed noise (n=5 seeds;" in text
    assert "pairwise" not in text
    worse = finding(_rows({"fitnet": [-0.05, -0.06, -0.04, -0.055, -0.045], "x": [0.1, 0.2]}), "test mIoU")
    assert worse.startswith("fitnet is worse than no KD: -0.0500") and worse.endswith(
        "1 more method with fewer than 3 seeds in common with the baseline not judged."
    )
    assert finding(_rows({"cwd": [0.1, 0.2]}), "test mIoU").startswith("Too few seeds to tell")


def test_summary_row_of_a_study_without_a_best_trial():
    """No finished trial has the objective (e.g. it was never logged): the row says so, no AttributeError."""
    trials = pd.DataFrame(
        {"state": ["finished", "diverged"], "trial": [0, 1], "metrics.val/miou": [np.nan] * 2}
    )
    study = StudyRuns("x", None, trials, pd.DataFrame({"metrics.test/miou": []}))
    (row,) = summary_table([StudyReport(study, pd.DataFrame(), [], [])]).frame.to_dict("records")
    assert (
        np.isnan(row["best trial"]) and np.isnan(row["best objective std"]) and row["its test metric"] == ""
    )
    assert row["trials finished"] == 1 and row["trials diverged"] == 1


# A synthetic study, built as load_study returns it: every table function runs on it without a sweep.
# none: 1 trial; response: 3 trials (lr 0.1 has the best val score but one seed diverged; lr 0.01 and
# 0.001 finished every seed); fitnet: 1 trial whose seeds all diverged.
SYNTHETIC = [  # method, lr, per seed: (state, val/miou, test/miou)
    ("none", 0.01, [("finished", 0.50, 0.48), ("finished", 0.52, 0.50), ("finished", 0.51, 0.49)]),
    ("response", 0.1, [("finished", 0.90, 0.88), ("diverged", None, None), ("finished", 0.92, 0.90)]),
    ("response", 0.01, [("finished", 0.60, 0.58), ("finished", 0.62, 0.61), ("finished", 0.61, 0.60)]),
    ("response", 0.001, [("finished", 0.40, 0.38), ("finished", 0.41, 0.39), ("finished", 0.42, 0.40)]),
    ("fitnet", 0.01, [("diverged", None, None)] * 3),
]


def synthetic_study(spec=SYNTHETIC) -> StudyRuns:
    trials, seeds = [], []
    for number, (method, lr, runs) in enumerate(spec):
        params = {"params.kd.method": method, "params.train.lr": lr, "params.train.epochs": 8}
        params |= {
            "params.model.width": 2,
            "params.train.optimizer": "adam",
            "params.train.scheduler": "none",
        }
        done = [r for r in runs if r[0] == "finished"]
        trial = {"run_id": f"t{number}", "trial": number, "method": method, **params}
        states = {r[0] for r in runs}
        trial["state"] = next((s for s in ("failed", "diverged") if s in states), "finished")
        trial["metrics.n_seeds"] = (
            len(done) if trial["state"] != "failed" else np.nan
        )  # a failed trial logs none
        for i, metric in ((1, "val/miou"), (2, "test/miou")):
            values = [r[i] for r in done]
            trial[f"metrics.{metric}"] = statistics.fmean(values) if values else np.nan
            trial[f"metrics.{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        trials.append(trial)
        for seed, (state, val, test) in enumerate(runs):
            metrics = {"metrics.val/miou": val, "metrics.test/miou": test}
            metrics |= {"metrics.params": 1000.0, "metrics.ms_per_image": 1.0 + number + seed / 10}
            if state != "finished":
                metrics = dict.fromkeys(metrics, np.nan)
            seeds.append({"run_id": f"t{number}s{seed}", "trial_run": f"t{number}", "trial": number})
            seeds[-1] |= {"seed": seed, "state": state, "method": method, **params, **metrics}
    frame = pd.DataFrame(trials)
    frame["trial"] = frame["trial"].astype("Int64")
    return StudyRuns("synthetic", None, frame, pd.DataFrame(seeds))


@pytest.fixture(scope="module")
def synthetic():
    study = synthetic_study()
    groups = build_groups(study)
    seeds = group_seeds(study, groups)
    return SimpleNamespace(study=study, groups=groups, seeds=seeds, args=(study, groups, seeds))


def test_a_configuration_with_a_diverged_seed_never_ranks_above_a_complete_one(synthetic):
    table = method_table(*synthetic.args).frame.set_index("KD method")
    # lr 0.1 has the best val/miou (0.91 over its two finished seeds) but lost a seed: lr 0.01 is chosen
    assert table.loc["response", "trial #"] == "2"
    assert table.loc["response", "test mIoU"] == pytest.approx(statistics.fmean([0.58, 0.61, 0.60]))
    best = best_trials_table(*synthetic.args).frame
    assert list(best["trial"]) == [2, 0, 3, 1]  # the diverged trial last, despite the highest score
    assert list(best["val/miou div."]) == [0, 0, 0, 1] and list(best["val/miou n"]) == [3, 3, 3, 2]
    assert "| 1 | 0.9100 ± 0.0141 (n=2, 1 div.) |" in md_table(best)


def test_an_all_diverged_method_is_a_div_row_with_its_counts(synthetic):
    table = method_table(*synthetic.args)
    frame = table.frame.set_index("KD method")
    assert list(table.frame["KD method"]) == ["none", "fitnet", "response"]
    assert frame.loc["fitnet", "test mIoU"] == "Div."
    assert frame.loc["fitnet", "test mIoU n"] == 0 and frame.loc["fitnet", "test mIoU div."] == 3
    assert frame.loc["fitnet", "trial #"] == "4"
    lines = md_table(table.frame)
    assert "| none | 0.4900 ± 0.0100 (n=3) |" in lines
    assert "| fitnet | Div. (n=0, 3 div.) |" in lines
    base = baseline_table(*synthetic.args)
    rows = base.frame.set_index("KD method")
    assert rows.loc["fitnet", "test mIoU KD"] == "Div." and rows.loc["fitnet", "test mIoU KD div."] == 3
    assert rows.loc["fitnet", "verdict"] == "no finished seed (Div.): not compared"
    assert rows.loc["response", "seeds paired"] == 3  # the complete lr 0.01 configuration, not lr 0.1
    assert base.findings[0].endswith(" fitnet: no seed finished (diverged or failed), not compared.")


def test_tuning_budget_column_schedule_and_flag(synthetic):
    table = method_table(*synthetic.args)
    frame = table.frame.set_index("KD method")
    assert dict(frame["tuning trials"]) == {"none": 1, "fitnet": 1, "response": 3}
    assert set(frame["schedule"]) == {"8 ep, adam, lr 0.01, constant"}  # one schedule: no note on it
    flag = "response got 3 trials of tuning, none 1: its advantage may come from tuning, not KD."
    assert flag in table.note and "fitnet got" not in table.note and "different schedules" not in table.note
    base = baseline_table(*synthetic.args)
    budgets = dict(base.frame.set_index("KD method")["tuning trials KD / none"])
    assert budgets == {"fitnet": "1 / 1", "response": "3 / 1"} and flag in base.note


def test_ms_per_image_is_one_figure_per_architecture(synthetic):
    ms = [r["metrics.ms_per_image"] for _, r in synthetic.study.seeds.iterrows()]
    table = method_table(*synthetic.args)
    assert list(table.frame["ms/image"]) == [pytest.approx(np.nanmedian(ms))] * 3  # one width: one figure
    assert "ms/image std" not in table.frame and "measured once per student architecture" in table.note


def test_failed_seeds_are_counted_in_the_cell():
    """A seed that raised fails its trial; the seeds that finished before it still show, with the failure."""
    spec = [
        *SYNTHETIC[:1],
        ("dist", 0.01, [("finished", 0.7, 0.66), ("finished", 0.7, 0.68), ("failed", None, None)]),
    ]
    study = synthetic_study(spec)
    groups = build_groups(study)
    table = method_table(study, groups, group_seeds(study, groups)).frame.set_index("KD method")
    assert table.loc["dist", "test mIoU n"] == 2 and table.loc["dist", "test mIoU failed"] == 1
    assert "| dist | 0.6700 ± 0.0141 (n=2, 1 failed) |" in md_table(table.reset_index())
