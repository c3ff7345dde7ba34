"""Equal tuning, then confirmation: every arm (each kd.method, none included) gets the same number of
tuning trials with the search restricted to it; then each arm's best configuration on the validation
objective is retrained on confirmation seeds no tuning trial used, and only those runs carry the verdict."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep.arms import ArmTuner, record_tuning, tuning_counts
from harness.sweep.config import StudyConfig, load_study
from harness.sweep.optuna_study import TrialFailed, optimize
from harness.sweep.trial import sample
from tests.conftest import write_yaml
from tests.test_sweep_rerun import journal_study

SEARCH = {
    "kd.method": {"choices": ["none", "response", "cwd"]},
    "kd.temperature": {"low": 1.0, "high": 8.0, "when": {"kd.method": "response"}},
    "kd.tau": {"low": 1.0, "high": 8.0, "when": {"kd.method": "cwd"}},
    "train.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True},
}


def arms_study(**fields) -> StudyConfig:
    tree = {
        "name": "arms",
        "experiment": "unused.yaml",
        "search": SEARCH,
        "arms": {"key": "kd.method", "trials": 3},
    }
    return StudyConfig.model_validate({**tree, "sampler": {"name": "tpe", "startup_trials": 1}, **fields})


def fake_runner(cfg: StudyConfig, fail: str | None = None):
    """Samples as the real objective does and scores lr; trials of arm ``fail`` raise once."""
    failed = []

    def run(trial):
        params = sample(trial, cfg)
        trial.set_user_attr("state", "finished")
        if params["kd.method"] == fail and not failed:
            failed.append(trial.number)
            trial.set_user_attr("state", "failed")
            raise TrialFailed("boom")
        return -abs(params["train.lr"] - 0.01)

    return run


def test_each_arm_gets_the_same_number_of_tuning_trials_within_its_own_search():
    cfg = arms_study()
    assert cfg.budget.trials == 9  # 3 arms x 3 trials
    study = optuna.create_study(direction="maximize")
    optimize(
        cfg,
        study,
        fake_runner(cfg),
        trials=cfg.budget.trials,
        timeout=None,
        before_trial=ArmTuner(cfg, study),
    )
    trials = study.get_trials()
    assert len(trials) == 9
    by_arm = {arm: [t for t in trials if t.params["kd.method"] == arm] for arm in ("none", "response", "cwd")}
    assert {arm: len(ts) for arm, ts in by_arm.items()} == {"none": 3, "response": 3, "cwd": 3}
    assert all(set(t.params) == {"kd.method", "train.lr"} for t in by_arm["none"])
    assert all(set(t.params) == {"kd.method", "kd.temperature", "train.lr"} for t in by_arm["response"])
    assert all(set(t.params) == {"kd.method", "kd.tau", "train.lr"} for t in by_arm["cwd"])
    counts = tuning_counts(cfg, trials)
    assert counts["short"] == {} and counts["arms"]["cwd"] == {
        "trials": 3, "finished": 3, "pruned": 0, "diverged": 0, "failed": 0,
    }  # fmt: skip


def test_an_arm_sampler_sees_only_its_own_arms_trials():
    from harness.sweep.arms import ArmView

    study = optuna.create_study()
    for method in ("none", "response", "none"):
        study.enqueue_trial({"kd.method": method})
        study.optimize(
            lambda t: t.suggest_categorical("kd.method", ["none", "response"]) == "none", n_trials=1
        )
    view = ArmView(study, "kd.method", "none")
    assert [t.number for t in view.get_trials()] == [0, 2]
    assert [t.number for t in view._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))] == [0, 2]
    assert view.direction == study.direction  # everything else is the study's


def test_an_arm_that_got_fewer_tuning_trials_is_recorded(capsys):
    cfg = arms_study()
    study = optuna.create_study(direction="maximize")
    optimize(
        cfg, study, fake_runner(cfg, fail="cwd"), trials=7, timeout=None, before_trial=ArmTuner(cfg, study)
    )
    counts = record_tuning(cfg, study)  # a budget cut short (e.g. by a timeout) after seven trials
    assert study.user_attrs["tuning"] == counts
    assert sorted(a["trials"] for a in counts["arms"].values()) == [2, 2, 3]
    assert counts["arms"]["cwd"]["failed"] == 1  # a failure takes the arm's trial: shown, not hidden
    assert len(counts["short"]) == 2 and "unequal tuning" in capsys.readouterr().err


def study_tree(exp, **fields) -> dict:
    return {
        "experiment": str(exp),
        "search": {"kd.method": {"choices": ["none", "response"]}, "train.lr": {"low": 0.005, "high": 0.05}},
        "arms": {"key": "kd.method", "trials": 2},
        "seeds": [0, 1],
        **fields,
    }


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"confirm": {"seeds": [1, 100]}}, ["confirm.seeds [1]", "tuning seeds", "start: 100"]),
        ({"confirm": {"seeds": {"first": 3, "max": 6, "start": 1}}}, ["confirm.seeds [1]"]),
        ({"arms": None, "confirm": {"seeds": [100]}, "budget": {"trials": 2}}, ["declare arms"]),
        ({"budget": {"trials": 3}}, ["budget.trials is 3", "2 arms x 2 trials"]),
        ({"arms": {"key": "train.lr", "trials": 2}}, ["arms.key 'train.lr'"]),
        ({"seeds": {"first": 3, "max": 5}, "confirm": {"seeds": [100]}}, ["confirm.seeds", "list"]),
    ],
    ids=["overlap", "schedule overlap", "confirm without arms", "budget", "range arm", "two schedules"],
)
def test_bad_arms_or_confirmation_is_one_line_naming_the_fix(tmp_path, tiny_experiment, fields, words):
    tree = {k: v for k, v in study_tree(tiny_experiment, **fields).items() if v is not None}
    path = write_yaml(tmp_path / "bad.yaml", tree)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert main(["sweep", "--study", str(path), "--storage", str(tmp_path / "j.log"), "--quiet"]) == 2


def test_a_grid_arm_gets_its_grid_points(tmp_path, tiny_experiment):
    search = {"kd.method": {"choices": ["none", "response"]}, "train.lr": {"choices": [0.01, 0.02, 0.03]}}
    tree = study_tree(tiny_experiment, search=search, sampler={"name": "grid"}, arms={"key": "kd.method"})
    cfg = load_study(write_yaml(tmp_path / "grid.yaml", tree))
    assert cfg.arms.trials == 3 and cfg.budget.trials == 6


@pytest.mark.slow
def test_confirmation_retrains_each_arms_best_configuration_on_its_own_seeds(
    tmp_path, store, tiny_experiment
):
    study = write_yaml(
        tmp_path / "confirm.yaml",
        {
            **study_tree(tiny_experiment, seeds=[0]),
            "sampler": {"name": "tpe", "seed": 0, "startup_trials": 1},
            "confirm": {"seeds": [100]},
            "fixed": {"train.epochs": 1},
        },
    )
    journal = tmp_path / "journal.log"
    assert main(["sweep", "--study", str(study), "--storage", str(journal), "--quiet"]) == 0

    optuna_study = journal_study(journal, "confirm")
    trials = optuna_study.trials
    tuning = [t for t in trials if t.user_attrs.get("phase") == "tuning"]
    confirmation = [t for t in trials if t.user_attrs.get("phase") == "confirmation"]
    assert sorted(t.user_attrs["arm"] for t in tuning) == ["none", "none", "response", "response"]
    assert all(t.user_attrs["seeds"] == [0] for t in tuning)
    assert len(confirmation) == 2 and all(t.state == TrialState.COMPLETE for t in confirmation)
    for t in confirmation:
        mine = [u for u in tuning if u.user_attrs["arm"] == t.user_attrs["arm"]]
        best = max(mine, key=lambda u: (u.value, -u.number))
        assert t.params == best.params and t.user_attrs["tuned_by"] == best.number
        assert t.user_attrs["seeds"] == [100] and list(t.user_attrs["seed_metrics"]) == ["100"]
    assert optuna_study.user_attrs["tuning"]["arms"]["none"]["trials"] == 2
    assert optuna_study.user_attrs["tuning"]["short"] == {}

    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("confirm").experiment_id
    runs = client.search_runs([exp_id], "tags.role = 'seed'", max_results=100)
    seeds = {(r.data.tags["phase"], r.data.tags["arm"], r.data.tags["seed"]) for r in runs}
    assert sorted(seeds) == [
        ("confirmation", "none", "100"),
        ("confirmation", "response", "100"),
        ("tuning", "none", "0"),
        ("tuning", "response", "0"),
    ]
    assert len(runs) == 6  # four tuning runs on seed 0, one confirmation run per arm on seed 100
    trial_runs = client.search_runs([exp_id], "tags.role = 'trial' and tags.phase = 'confirmation'")
    assert sorted(r.data.tags["arm"] for r in trial_runs) == ["none", "response"]
    (parent,) = client.search_runs([exp_id], "tags.role = 'study'")
    assert parent.data.metrics["tuning_trials/none"] == parent.data.metrics["tuning_trials/response"] == 2
    assert json.loads(parent.data.tags["confirmation"])["seeds"] == [100]
    assert {"tuning.json", "confirmation.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def fake_training(cfg, tracker, **kwargs):
    """No training: response is 0.05 test mIoU above none on every seed (seed noise 0.002); the
    validation objective prefers lr near 0.01."""
    from harness.engine.run import Outcome

    seed = cfg.train.seed
    noise = 0.002 * ((seed * 7919 + len(cfg.kd.method)) % 13 - 6) / 6
    test = 0.5 + 0.01 * ((seed * 104729) % 11) / 11 + (0.05 if cfg.kd.method == "response" else 0.0) + noise
    val = 0.5 - abs(cfg.train.lr - 0.01)
    return Outcome("fake", "finished", {"val/miou": val, "test/miou": test})


def test_sequential_rounds_run_on_the_confirmation_seeds(tmp_path, store, tiny_experiment, monkeypatch):
    import harness.sweep.trial as trial_module

    monkeypatch.setattr(trial_module, "run_experiment", fake_training)
    study = write_yaml(
        tmp_path / "seq.yaml",
        {
            **study_tree(tiny_experiment, seeds=[0]),
            "confirm": {"seeds": {"first": 3, "max": 9, "step": 2, "start": 100}},
            "min_effect": 0.01,
        },
    )
    journal = tmp_path / "journal.log"
    assert main(["sweep", "--study", str(study), "--storage", str(journal), "--quiet"]) == 0
    optuna_study = journal_study(journal, "seq")
    trials = optuna_study.trials
    confirmation = [t for t in trials if t.user_attrs.get("phase") == "confirmation"]
    trained = sorted((t.user_attrs["arm"], s) for t in confirmation for s in t.user_attrs["seed_states"])
    assert trained == [(arm, str(s)) for arm in ("none", "response") for s in range(100, 105)]
    assert {t.user_attrs["round"] for t in confirmation} == {0, 1}  # the first seeds, then one round
    tuning = [t for t in trials if t.user_attrs.get("phase") == "tuning"]
    assert len(tuning) == 4 and all(list(t.user_attrs["seed_states"]) == ["0"] for t in tuning)
    state = optuna_study.user_attrs["sequential"]
    (row,) = state["rows"]
    assert state["phase"] == "confirmation" and row["seeds"] == [100, 101, 102, 103, 104]
    assert (row["verdict"], row["stopped"]) == ("better", "decided")
    assert row["kd"]["trial"] == optuna_study.user_attrs["confirmation"]["arms"][1]["trial"]
