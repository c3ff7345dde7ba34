"""Seeds until decided: a study's ``seeds: {first, max, step}`` runs the first seeds for every compared row,
then gives more seeds only to the rows still undecided (report/sequential.py decides), until each is
decided or has ``max``. The round planner is tested on fake per-seed values; one real tiny study runs two
rounds through Optuna and MLflow, is interrupted in its second and resumed without retraining a seed."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep.config import load_study
from harness.sweep.rounds import Family, record, replay
from harness.sweep.rows import Config, Row
from harness.sweep.schema import SeedSchedule
from tests.conftest import write_yaml
from tests.test_sweep_rerun import experiment, journal_study


def config(name: str) -> Config:
    return Config(name, f"hash-{name}", {"kd.method": name}, trial=0, value=0.5)


BASE = config("none")
ROWS = [Row("big", config("big"), BASE), Row("null", config("null"), BASE)]


def fake_metric(rng_seed: int, effects: dict[str, tuple[float, float]]):
    """Test mIoU of each configuration on each seed: the baseline's noise plus the row's effect and noise."""

    def value(config_hash: str, seed: int) -> float:
        base = 0.5 + 0.02 * np.random.default_rng([rng_seed, seed]).standard_normal()
        mean, sd = effects.get(config_hash, (0.0, 0.0))
        noise = np.random.default_rng([rng_seed, seed, len(config_hash)]).standard_normal()
        return float(base + mean + sd * noise)

    return value


def run_planner(rows, schedule, value, min_effect=None, fails=()):
    """Drive replay() as the sweep does: train whatever a round lacks, until every row stopped. Returns the
    seeds trained per round and configuration, and the last progress. ``fails``: (hash, seed) that diverge."""
    values: dict[str, dict[int, float]] = {}
    ended: dict[str, set[int]] = {}
    rounds = []
    for _ in range(50):
        progress = replay(Family(rows, schedule, min_effect=min_effect), values, ended)
        if progress.done:
            return rounds, progress
        rounds.append({need.config.config_hash: need.seeds for need in progress.needs})
        for need in progress.needs:
            for seed in need.seeds:
                ended.setdefault(need.config.config_hash, set()).add(seed)
                if (need.config.config_hash, seed) not in fails:
                    values.setdefault(need.config.config_hash, {})[seed] = value(
                        need.config.config_hash, seed
                    )
    raise AssertionError("the rounds never ended")


def test_rounds_add_seeds_only_to_undecided_rows_until_decided_or_max():
    schedule = SeedSchedule(first=3, max=9, step=2)
    value = fake_metric(0, {"hash-big": (0.05, 0.002), "hash-null": (0.0, 0.01)})
    rounds, progress = run_planner(ROWS, schedule, value)
    assert rounds[0] == {"hash-big": [0, 1, 2], "hash-none": [0, 1, 2], "hash-null": [0, 1, 2]}
    assert rounds[1] == {"hash-big": [3, 4], "hash-none": [3, 4], "hash-null": [3, 4]}
    # 'big' is decided at five seeds: later rounds go to 'null' and the baseline it shares, only
    assert rounds[2:] == [
        {"hash-none": [5, 6], "hash-null": [5, 6]},
        {"hash-none": [7, 8], "hash-null": [7, 8]},
    ]
    big, null = progress.results
    assert (big.verdict, big.n, big.stopped) == ("better", 5, "decided")
    assert (null.verdict, null.n, null.stopped) == ("undecided", 9, "max reached")
    assert progress.lengths == [5, 9]  # a stopped row keeps its seeds while its baseline gets more


def test_a_margin_stops_a_row_without_an_effect_as_equivalent():
    schedule = SeedSchedule(first=3, max=20, step=2)
    value = fake_metric(1, {"hash-null": (0.0, 0.0005)})
    rounds, progress = run_planner(ROWS[1:], schedule, value, min_effect=0.01)
    (null,) = progress.results
    assert (null.verdict, null.stopped) == ("equivalent", "decided")
    assert null.n < 20 and len(rounds) == 1 + (null.n - 3) // 2  # stopped early instead of at max


def test_a_seed_that_ended_without_a_value_is_not_trained_again():
    schedule = SeedSchedule(first=3, max=5, step=2, start=10)
    value = fake_metric(2, {"hash-big": (0.0, 0.01)})
    rounds, progress = run_planner(ROWS[:1], schedule, value, fails={("hash-big", 11)})
    trained = [(h, s) for r in rounds for h, seeds in r.items() for s in seeds]
    assert len(trained) == len(set(trained)) == 2 * 5  # seeds 10-14 of each configuration, once each
    (big,) = progress.results
    assert progress.done and big.n == 4  # paired over the four seeds both finished
    # decide() counts four seeds, below max; the row got every seed the schedule has, so it stopped
    (row,) = record(optuna.create_study(), Family(ROWS[:1], schedule), progress, "test/miou")["rows"]
    assert row["stopped"] == "max reached" and row["seeds"] == [10, 11, 12, 13, 14] and row["n"] == 4


def test_the_recorded_state_names_each_rows_seeds_verdict_and_why_it_stopped():
    schedule = SeedSchedule(first=3, max=9, step=2)
    value = fake_metric(0, {"hash-big": (0.05, 0.002), "hash-null": (0.0, 0.01)})
    _, progress = run_planner(ROWS, schedule, value)
    study = optuna.create_study()
    state = record(study, Family(ROWS, schedule, chosen_from=[0, 1]), progress, "test/miou")
    assert study.user_attrs["sequential"] == json.loads(json.dumps(state))  # JSON-safe as stored
    big, null = state["rows"]
    assert big["row"] == "big" and big["seeds"] == [0, 1, 2, 3, 4] and big["stopped"] == "decided"
    assert null["seeds"] == list(range(9)) and null["stopped"] == "max reached"
    assert null["seeds_needed"] is not None and big["seeds_needed"] is None
    assert state["done"] and big["kd"]["config_hash"] == "hash-big" and state["chosen_from"] == [0, 1]


def test_a_dead_rounds_trial_is_requeued_as_a_round():
    from harness.sweep import leases

    study = optuna.create_study()
    trial = study.ask()
    attrs = {
        "round": 2,
        "seeds": [5, 6],
        "config_hash": "h",
        "lease": {"host": leases.HOST, "pid": 2**22 + 7, "beat": 0},
    }
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    assert leases.recover_dead_trials(study, lambda number, why: None) == [0]
    (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert {k: waiting.user_attrs[k] for k in ("round", "seeds", "config_hash")} == {
        "round": 2,
        "seeds": [5, 6],
        "config_hash": "h",
    }


def study_tree(exp, **fields) -> dict:
    return {
        "experiment": str(exp),
        "budget": {"trials": 2},
        "search": {"kd.method": {"choices": ["none", "response"]}},
        **fields,
    }


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"seeds": {"first": 2, "max": 20, "step": 2}}, ["first=2", "3 <= first"]),
        ({"seeds": {"first": 5, "max": 4}}, ["max=4", "first <= max"]),
        ({"seeds": {"first": 3, "max": 5, "stop": 1}}, ["stop", "unknown key"]),
        (
            {"seeds": {"first": 3, "max": 5}, "search": {"train.lr": {"choices": [0.1]}}},
            ["kd.method", "none"],
        ),
        ({"min_effect": 0}, ["min_effect", "greater than 0"]),
    ],
    ids=["first below 3", "max below first", "unknown key", "no baseline", "margin 0"],
)
def test_a_bad_schedule_is_one_line_naming_the_fix(tmp_path, fields, words):
    path = write_yaml(tmp_path / "bad.yaml", study_tree(experiment(tmp_path), **fields))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert main(["sweep", "--study", str(path), "--storage", str(tmp_path / "j.log"), "--quiet"]) == 2


def test_a_schedule_trains_its_first_seeds_in_tuning(tmp_path, tiny_experiment):
    path = write_yaml(
        tmp_path / "ok.yaml", study_tree(tiny_experiment, seeds={"first": 3, "max": 7}, min_effect=0.01)
    )
    study = load_study(path)
    assert study.trial_key({"kd.method": "none"})[1] == (0, 1, 2)
    assert study.schedule()[0].looks() == [3, 5, 7]
    assert study.definition()["seeds"] == {"first": 3, "max": 7, "step": 2, "start": 0}
    assert study.definition()["min_effect"] == 0.01


@pytest.mark.slow
def test_a_study_runs_rounds_and_resumes_an_interrupted_one_without_retraining(
    tmp_path, store, tiny_experiment, monkeypatch, capsys
):
    import harness.sweep.trial as trial_module

    study = write_yaml(
        tmp_path / "rounds.yaml",
        {
            "experiment": str(tiny_experiment),
            "sampler": {"name": "grid"},
            "seeds": {"first": 3, "max": 5, "step": 2},
            "fixed": {"train.epochs": 1},
            "search": {"kd.method": {"choices": ["response", "none"]}},
        },
    )
    journal = tmp_path / "journal.log"
    real, fired = trial_module.run_experiment, []

    def interrupted_at_seed_4(cfg, tracker, **kwargs):
        if kwargs["run_name"].endswith("-seed-4") and not fired:
            fired.append(kwargs["run_name"])
            raise KeyboardInterrupt
        return real(cfg, tracker, **kwargs)

    monkeypatch.setattr(trial_module, "run_experiment", interrupted_at_seed_4)
    args = ["sweep", "--study", str(study), "--storage", str(journal), "--quiet"]
    assert main(args) == 130
    assert fired == ["trial-2-seed-4"]  # the first round's first trial, after its seed 3
    assert (
        "round 1: 1 of 1 rows undecided (response); adding 2 configurations: seeds 3, 4"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(trial_module, "run_experiment", real)
    assert main(args) == 0

    trials = journal_study(journal, "rounds").trials
    tuning = [t for t in trials if "round" not in t.user_attrs]
    assert len(tuning) == 2 and all(t.user_attrs["seeds"] == [0, 1, 2] for t in tuning)
    rounds = [t for t in trials if t.user_attrs.get("round") == 1 and t.user_attrs.get("state") == "finished"]
    by_method = {}
    for t in rounds:
        by_method.setdefault(t.params["kd.method"], []).extend(t.user_attrs["seeds"])
    assert {m: sorted(s) for m, s in by_method.items()} == {"response": [4], "none": [3, 4]}

    client = MlflowClient(store)
    exp_id = client.get_experiment_by_name("rounds").experiment_id
    seed_runs = client.search_runs(
        [exp_id], "tags.role = 'seed' and tags.state = 'finished'", max_results=100
    )
    trained = [(r.data.tags["kd.method"], int(r.data.tags["seed"])) for r in seed_runs]
    assert sorted(trained) == sorted((m, s) for m in ("none", "response") for s in range(5))  # each once
    assert {r.data.tags.get("round") for r in seed_runs if int(r.data.tags["seed"]) >= 3} == {"1"}

    state = journal_study(journal, "rounds").user_attrs["sequential"]
    (row,) = state["rows"]
    assert state["done"] and state["metric"] == "test/miou"
    assert row["row"] == "response" and row["seeds"] == [0, 1, 2, 3, 4] and row["n"] == 5
    assert row["stopped"] in ("decided", "max reached") and row["verdict"] in ("better", "worse", "undecided")
    (parent,) = client.search_runs([exp_id], "tags.role = 'study'")
    assert json.loads(parent.data.tags["sequential"]) == state
    assert "sequential.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["trials_finished"] == 2  # rounds do not count toward the budget


def test_a_changed_schedule_or_margin_is_announced():
    from harness.sweep.optuna_study import definition_changes

    old = {"seeds": [0, 1, 2], "fixed": {}, "search": {}}
    new = {**old, "seeds": {"first": 3, "max": 9, "step": 2, "start": 0}, "min_effect": 0.01}
    changes = definition_changes(old, new)
    assert changes == [
        "seeds [0, 1, 2] -> {'first': 3, 'max': 9, 'step': 2, 'start': 0}",
        "min_effect (unset) -> 0.01",
    ]
    assert definition_changes(old, dict(old)) == []


def test_every_seed_a_round_adds_goes_to_a_round_trial():
    """Round trials carry their round (0: the first seeds, when tuning trials did not record theirs), so
    they are never taken for tuning trials, which would count toward the budget and skip as duplicates."""
    from harness.sweep.optuna_study import is_extra

    schedule = SeedSchedule(first=3, max=5)
    first = replay(Family(ROWS[:1], schedule), {}, {})
    assert [need.attrs for need in first.needs] == [{"round": 0}, {"round": 0}]
    ended = {"hash-big": {0, 1, 2}, "hash-none": {0, 1, 2}}
    values = {h: {s: 0.5 + 0.01 * s * (h == "hash-big") + 0.001 * (s % 2) for s in range(3)} for h in ended}
    second = replay(Family(ROWS[:1], schedule, phase="confirmation"), values, ended)
    assert second.round == 1 and [need.seeds for need in second.needs] == [[3, 4], [3, 4]]
    assert second.needs[0].attrs == {"phase": "confirmation", "arm": None, "tuned_by": 0, "round": 1}
    study = optuna.create_study()
    study.enqueue_trial({}, user_attrs=first.needs[0].attrs)
    assert is_extra(study.trials[0])
