"""Re-running a study after its file changed: what counts as trained is the resolved config (experiment,
fixed, sampled values, teacher) and the seeds; a changed objective is refused. Also: seeds set through
``train.seed``, the no-KD baseline never pruned, and ``train.select_on`` following the objective."""

from __future__ import annotations

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness.cli import main
from harness.errors import ConfigError
from harness.sweep.config import load_study
from tests.conftest import TINY_DATA, TINY_TRAIN, write_yaml


def journal_study(path, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


def complete(journal, name: str) -> list:
    return [t for t in journal_study(journal, name).trials if t.state == TrialState.COMPLETE]


def experiment(tmp_path, **train):
    return write_yaml(
        tmp_path / "exp.yaml",
        {
            "name": "rerun",
            "data": TINY_DATA,
            "model": {"name": "unet", "width": 2, "depth": 3},
            "train": {**TINY_TRAIN, "epochs": 1, **train},
        },
    )


def sweep(study, journal, *extra) -> int:
    return main(["sweep", "--study", str(study), "--storage", str(journal), "--quiet", *extra])


def edit(path, **fields):
    tree = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**tree, **fields}, sort_keys=False))


@pytest.mark.slow
def test_a_rerun_trains_what_a_changed_definition_adds(tmp_path, store, capsys):
    exp = experiment(tmp_path)
    grid = {"train.lr": {"choices": [0.01, 0.03]}}
    # an explicit budget of the grid's size, as methods.yaml has: the earlier trials must not spend it
    study = write_yaml(
        tmp_path / "grid.yaml",
        {"experiment": str(exp), "budget": {"trials": 2}, "sampler": {"name": "grid"}, "search": grid},
    )
    journal = tmp_path / "journal.log"
    assert sweep(study, journal) == 0
    assert len(complete(journal, "grid")) == 2
    capsys.readouterr()

    edit(study, seeds=[0, 1])
    assert sweep(study, journal) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "seeds [0] -> [0, 1]" in notes[0] and "2 earlier trials" in notes[0], notes
    done = complete(journal, "grid")
    assert len(done) == 4 and [t.user_attrs["seeds"] for t in done[2:]] == [[0, 1], [0, 1]]

    edit(study, fixed={"train.epochs": 2})
    assert sweep(study, journal) == 0
    assert "fixed train.epochs: (unset) -> 2" in capsys.readouterr().err
    assert len(complete(journal, "grid")) == 6

    exp.write_text(exp.read_text().replace("batch_size: 16", "batch_size: 8"))  # the experiment file
    assert sweep(study, journal) == 0
    assert f"experiment {exp} edited" in capsys.readouterr().err
    assert len(complete(journal, "grid")) == 8

    n = len(journal_study(journal, "grid").trials)
    assert sweep(study, journal) == 0  # unchanged: nothing left to train, and nothing to say
    assert "note:" not in capsys.readouterr().err
    assert len(journal_study(journal, "grid").trials) == n

    client = MlflowClient(store)
    trial_runs = client.search_runs(
        [client.get_experiment_by_name("grid").experiment_id], "tags.role = 'trial'"
    )
    trained = {(r.data.tags["config_hash"], r.data.params["seeds"]) for r in trial_runs}
    assert len(trial_runs) == len(trained) == 8  # eight configurations, each trained once


@pytest.mark.slow
def test_a_changed_objective_is_refused(tmp_path, store, capsys):
    exp = experiment(tmp_path)
    study = write_yaml(tmp_path / "obj.yaml", {"experiment": str(exp), "budget": {"trials": 1}})
    journal = tmp_path / "journal.log"
    assert sweep(study, journal) == 0
    capsys.readouterr()

    edit(study, objective={"metric": "val/loss", "direction": "minimize"})
    assert sweep(study, journal, "--trials", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study obj:") and "\n" not in err, err
    assert "maximize val/miou" in err and "minimize val/loss" in err and "--study-name" in err
    assert len(journal_study(journal, "obj").trials) == 1

    edit(study, name="obj_loss")  # the fix the message names: a new study
    assert sweep(study, journal) == 0
    assert journal_study(journal, "obj_loss").direction == optuna.study.StudyDirection.MINIMIZE


@pytest.mark.slow
def test_changed_choices_are_refused_and_a_queued_value_outside_the_search_is_skipped(
    tmp_path, store, capsys
):
    exp = experiment(tmp_path)
    grid = {"train.lr": {"choices": [0.01, 0.03]}}
    study = write_yaml(
        tmp_path / "ch.yaml", {"experiment": str(exp), "sampler": {"name": "grid"}, "search": grid}
    )
    journal = tmp_path / "journal.log"
    assert sweep(study, journal) == 0
    capsys.readouterr()

    # Optuna cannot change a categorical's choices within a study: one line, exit 2, nothing trained
    edit(study, search={"train.lr": {"choices": [0.01]}})
    assert sweep(study, journal) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: study ch:") and "\n" not in err and "--study-name" in err, err
    assert len(journal_study(journal, "ch").trials) == 2

    # a range narrowed while a dead worker's value waits in the queue: skipped, not trained, not counted
    ranged = write_yaml(
        tmp_path / "rg.yaml",
        {
            "experiment": str(exp),
            "budget": {"trials": 1},
            "search": {"train.lr": {"low": 0.001, "high": 0.1}},
        },
    )
    assert sweep(ranged, journal) == 0
    journal_study(journal, "rg").enqueue_trial({"train.lr": 0.09})
    edit(ranged, search={"train.lr": {"low": 0.001, "high": 0.01}}, budget={"trials": 2})
    capsys.readouterr()
    assert sweep(ranged, journal) == 0
    assert "no longer searches" in capsys.readouterr().err
    done = complete(journal, "rg")
    assert len(done) == 2 and all(t.params["train.lr"] <= 0.01 for t in done[1:])


def test_the_study_name_can_be_overridden(tmp_path):
    study = write_yaml(
        tmp_path / "named.yaml", {"experiment": str(experiment(tmp_path)), "budget": {"trials": 1}}
    )
    assert load_study(study).name == "named"
    assert load_study(study, name="named_v2").name == "named_v2"


def stored_trial(params: dict, user_attrs: dict):
    dists = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
    return optuna.trial.create_trial(params=params, distributions=dists, value=0.5, user_attrs=user_attrs)


def test_a_duplicate_needs_the_same_config_hash_and_seeds(tmp_path):
    from harness.sweep.trial import duplicate_of

    cfg = load_study(
        write_yaml(tmp_path / "d.yaml", {"experiment": str(experiment(tmp_path)), "budget": {"trials": 3}})
    )
    study = optuna.create_study()
    attrs = {"state": "finished", "seeds": [0]}
    study.add_trial(stored_trial({"train.lr": 0.01}, {**attrs, "config_hash": "aaaa"}))
    study.add_trial(stored_trial({"train.lr": 0.01}, {**attrs, "config_hash": "bbbb", "seeds": [0, 1]}))
    trial = study.ask()
    assert duplicate_of(trial, cfg, "aaaa", [0]) == 0
    assert duplicate_of(trial, cfg, "bbbb", [0, 1]) == 1
    assert duplicate_of(trial, cfg, "cccc", [0]) is None  # same search values, other fixed/experiment
    assert duplicate_of(trial, cfg, "aaaa", [0, 1]) is None


def test_the_config_hash_names_the_teacher_by_what_it_is(tmp_path, tiny_experiment, tiny_teacher):
    study = write_yaml(
        tmp_path / "t.yaml",
        {
            "experiment": str(tiny_experiment),
            "budget": {"trials": 2},
            "search": {"kd.method": {"choices": ["none", "response"]}},
        },
    )
    cfg = load_study(study)
    kd, none = cfg.trial_key({"kd.method": "response"}), cfg.trial_key({"kd.method": "none"})
    assert kd[1] == none[1] == (0,) and kd[0] != none[0]

    moved = tiny_teacher.with_name("same_teacher.yaml")  # the same teacher under another file name
    moved.write_text(tiny_teacher.read_text())
    edit(tiny_experiment, teacher=str(moved))
    assert load_study(study).trial_key({"kd.method": "response"}) == kd

    edit(moved, model={"name": "unet", "width": 3, "depth": 3})  # another teacher under that name
    again = load_study(study)
    assert again.trial_key({"kd.method": "response"}) != kd
    assert again.trial_key({"kd.method": "none"}) == none  # without KD the teacher is not used


def seed_study(tmp_path, exp, **fields) -> dict:
    return {"experiment": str(exp), "budget": {"trials": 2}, **fields}


def test_seeds_follow_the_keys_that_set_train_seed(tmp_path):
    exp = experiment(tmp_path)
    fixed = load_study(write_yaml(tmp_path / "f.yaml", seed_study(tmp_path, exp, fixed={"train.seed": 5})))
    assert fixed.trial_key({})[1] == (5,)
    aliased = {"s": {"key": "train.seed", "choices": [0, 1, 2]}}
    grid = load_study(write_yaml(tmp_path / "g.yaml", seed_study(tmp_path, exp, search=aliased)))
    assert [grid.trial_key({"s": s})[1] for s in (0, 1, 2)] == [(0,), (1,), (2,)]
    assert len({grid.trial_key({"s": s})[0] for s in (0, 1, 2)}) == 1  # one configuration, three seeds


@pytest.mark.parametrize(
    "fields",
    [{"fixed": {"train.seed": 5}}, {"search": {"s": {"key": "train.seed", "choices": [0, 1]}}}],
    ids=["fixed", "aliased search"],
)
def test_train_seed_and_seeds_together_are_refused(tmp_path, fields):
    exp = experiment(tmp_path)
    path = write_yaml(tmp_path / "both.yaml", seed_study(tmp_path, exp, seeds=[0, 1], **fields))
    with pytest.raises(ConfigError, match="train.seed") as info:
        load_study(path)
    assert "\n" not in str(info.value) and "seeds" in str(info.value)


@pytest.mark.slow
def test_an_aliased_seed_search_trains_each_seed(tmp_path, store):
    exp = experiment(tmp_path)
    search = {"s": {"key": "train.seed", "choices": [0, 1]}}
    study = write_yaml(
        tmp_path / "seedgrid.yaml", seed_study(tmp_path, exp, sampler={"name": "grid"}, search=search)
    )
    journal = tmp_path / "journal.log"
    assert sweep(study, journal) == 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("seedgrid").experiment_id], "tags.role = 'seed'")
    assert sorted((r.data.tags["seed"], r.data.params["train.seed"]) for r in runs) == [
        ("0", "0"),
        ("1", "1"),
    ]
    assert sorted(t.user_attrs["seeds"] for t in complete(journal, "seedgrid")) == [[0], [1]]
    (parent,) = client.search_runs([runs[0].info.experiment_id], "tags.role = 'study'")
    assert parent.data.params["seeds"] == "one per trial: search.s"  # not the unused default [0]


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.slow
def test_the_baseline_is_never_pruned_in_a_study_that_compares_against_it(
    tmp_path, store, tiny_experiment, monkeypatch
):
    import harness.sweep.optuna_study as optuna_study

    monkeypatch.setattr(optuna_study, "make_pruner", lambda study: AlwaysPrune())
    study = write_yaml(
        tmp_path / "baseline.yaml",
        {
            "experiment": str(tiny_experiment),
            "sampler": {"name": "grid"},
            "pruner": {"name": "median"},
            "search": {"kd.method": {"choices": ["response", "none"]}},
        },
    )
    journal = tmp_path / "journal.log"
    assert sweep(study, journal) == 0
    states = {t.params["kd.method"]: t.state for t in journal_study(journal, "baseline").trials}
    assert states == {"response": TrialState.PRUNED, "none": TrialState.COMPLETE}


def test_select_on_follows_a_val_objective(tmp_path):
    exp = experiment(tmp_path)

    def overrides(**fields):
        path = write_yaml(tmp_path / "sel.yaml", {"experiment": str(exp), "budget": {"trials": 1}, **fields})
        return load_study(path).overrides({})

    loss = {"metric": "val/loss", "direction": "minimize"}
    assert overrides(objective=loss)["train.select_on"] == "val/loss"
    assert overrides(objective={"metric": "val/pixel_acc"})["train.select_on"] == "val/pixel_acc"
    assert "train.select_on" not in overrides()  # val/miou: the task's quality metric already decides
    assert "train.select_on" not in overrides(objective={"metric": "params", "direction": "minimize"})
    fixed = overrides(objective=loss, fixed={"train.select_on": "val/miou"})
    assert fixed["train.select_on"] == "val/miou"  # the study's own choice wins
