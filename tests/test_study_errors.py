"""Broken study files: one clear line naming the file, the key and the fix; exit status 2; nothing written."""

from __future__ import annotations

import pytest

from harness.cli import main
from tests.conftest import write_yaml


def good_study(experiment) -> dict:
    return {
        "experiment": str(experiment),
        "budget": {"trials": 2},
        "search": {
            "kd.method": {"choices": ["none", "response"]},
            "kd.temperature": {"low": 1.0, "high": 4.0, "when": {"kd.method": "response"}},
        },
    }


BROKEN = {
    "unknown top-level key": (lambda s: {**s, "budjet": {"trials": 2}}, "budjet: unknown key"),
    "no budget": (lambda s: {k: v for k, v in s.items() if k != "budget"}, "budget: required key is missing"),
    "empty budget": (lambda s: {**s, "budget": {}}, "set budget.trials or budget.timeout"),
    "unknown sampler": (
        lambda s: {**s, "sampler": {"name": "bayes"}},
        "sampler.name: Input should be 'tpe', 'random' or 'grid'",
    ),
    "unknown pruner": (lambda s: {**s, "pruner": {"name": "asha"}}, "pruner.name"),
    "unknown KD method": (
        lambda s: {**s, "search": {"kd.method": {"choices": ["none", "telepathy"]}}},
        "unknown choice 'telepathy'",
    ),
    "misspelt config key": (
        lambda s: {**s, "search": {"model.widht": {"choices": [2, 4]}}},
        "model.widht: unknown key",
    ),
    "low above high": (
        lambda s: {**s, "search": {"train.lr": {"low": 0.1, "high": 0.01}}},
        "low (0.1) is above high (0.01)",
    ),
    "log scale from zero": (
        lambda s: {**s, "search": {"train.lr": {"low": 0, "high": 0.1, "log": True}}},
        "log scale needs low > 0",
    ),
    "range and choices": (
        lambda s: {**s, "search": {"train.lr": {"low": 0.1, "high": 1, "choices": [1]}}},
        "either choices or low/high",
    ),
    "condition on unknown key": (
        lambda s: {
            **s,
            "search": {"kd.temperature": {"low": 1, "high": 2, "when": {"kd.mehtod": "response"}}},
        },
        "neither searched nor fixed",
    ),
    "condition listed after": (
        lambda s: {**s, "search": dict(reversed(list(s["search"].items())))},
        "list ['kd.method'] above kd.temperature",
    ),
    "unknown objective metric": (
        lambda s: {**s, "objective": {"metric": "accuracy@5"}},
        "unknown metric 'accuracy@5'",
    ),
    "bad direction": (
        lambda s: {**s, "objective": {"metric": "val/miou", "direction": "up"}},
        "objective.direction",
    ),
    "grid over a range": (
        lambda s: {**s, "sampler": {"name": "grid"}, "search": {"train.lr": {"low": 0.1, "high": 1.0}}},
        "grid sampler needs choices for every parameter",
    ),
    "missing experiment file": (
        lambda s: {**s, "experiment": "experiments/nope.yaml"},
        "experiment: file experiments/nope.yaml not found",
    ),
    "KD without a teacher": (lambda s: s, "needs a teacher"),
    "constraint with both bounds": (
        lambda s: {**s, "constraints": [{"metric": "params", "max": 1, "min": 0}]},
        "exactly one of max or min",
    ),
    "duplicate seeds": (lambda s: {**s, "seeds": [0, 0]}, "seeds has duplicates"),
    "fixed and searched": (lambda s: {**s, "fixed": {"kd.method": "none"}}, "both fixed and searched"),
    "impossible value": (
        lambda s: {**s, "fixed": {"train.epochs": -1}},
        "train.epochs: Input should be greater than or equal to 0",
    ),
    "selecting on a test metric": (
        lambda s: {**s, "objective": {"metric": "test/miou"}},
        "test/miou is a test metric",
    ),
    "constraint on a test metric": (
        lambda s: {**s, "constraints": [{"metric": "test/miou", "min": 0.5}]},
        "use val/miou",
    ),
    "epoch pruner with several seeds": (
        lambda s: {**s, "pruner": {"name": "median"}, "seeds": [0, 1, 2]},
        "use pruner: {name: wilcoxon}",
    ),
    "wilcoxon with one seed": (lambda s: {**s, "pruner": {"name": "wilcoxon"}}, "list at least 2 seeds"),
    "train.seed fixed and seeds listed": (
        lambda s: {**s, "fixed": {"train.seed": 5}, "seeds": [0, 1]},
        "['fixed.train.seed'] set train.seed and seeds is listed too",
    ),
    "train.seed searched under another name and seeds listed": (
        lambda s: {**s, "seeds": [0], "search": {"s": {"key": "train.seed", "choices": [0, 1]}}},
        "['search.s'] set train.seed and seeds is listed too",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_study_file_is_rejected_cleanly(case, tmp_path, tiny_experiment, store, capsys):
    edit, expected = BROKEN[case]
    study = good_study(tiny_experiment)
    if case != "KD without a teacher":
        study.setdefault("teacher", None)
    else:
        # an experiment with no teacher, searched over a KD method
        exp = tmp_path / "experiments" / "student.yaml"
        exp.write_text(exp.read_text().split("teacher:")[0])
    study = edit(study)
    study = {k: v for k, v in study.items() if v is not None}
    path = write_yaml(tmp_path / "studies" / "broken.yaml", study)
    journal = tmp_path / "journal.log"

    code = main(["sweep", "--study", str(path), "--storage", str(journal), "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {path}") and expected in err, err
    assert "Traceback" not in err
    assert not journal.exists() and not (tmp_path / "mlruns").exists()


def test_not_yaml_and_not_a_mapping(tmp_path, store, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("search: {kd.method: [\n")
    assert main(["sweep", "--study", str(path), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    path.write_text("- a\n- b\n")
    assert main(["sweep", "--study", str(path), "--quiet"]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_a_study_file_that_is_not_text(tmp_path, store, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)) * 4)
    assert main(["sweep", "--study", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: not a text file") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()


def test_a_grid_study_defaults_its_budget_to_the_grid_size(tmp_path, tiny_experiment):
    from harness.sweep.config import load_study

    study = good_study(tiny_experiment)
    del study["budget"]
    study["sampler"] = {"name": "grid"}
    study["search"] = {"model.width": {"choices": [1, 2, 4]}, "train.lr": {"choices": [0.01, 0.1]}}
    assert load_study(write_yaml(tmp_path / "grid.yaml", study)).budget.trials == 6


def test_every_shipped_study_file_validates():
    from pathlib import Path

    from harness.sweep.config import load_study

    files = sorted(Path("studies").glob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        study = load_study(path)
        assert study.budget.trials and study.search, path
