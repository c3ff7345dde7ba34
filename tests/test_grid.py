"""Grids with conditional entries: ``none`` once, ``response`` at each temperature, no repeated points."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.sweep.config import load_study
from harness.sweep.schema import grid_point_list
from tests.conftest import write_yaml

SEARCH = {
    "kd.method": {"choices": ["none", "response"]},
    "kd.regime": {"choices": ["soft", "mixed"], "when": {"kd.method": "response"}},
    "kd.soft_epochs": {"choices": [1], "when": {"kd.regime": "sequential"}},
    "kd.temperature": {"choices": [2, 4], "when": {"kd.method": ["response"]}},
}


def test_conditional_entries_appear_only_where_their_condition_holds():
    points = grid_point_list(SEARCH)
    assert points[0] == {"kd.method": "none"}
    assert len(points) == 1 + 2 * 2 and all("kd.soft_epochs" not in p for p in points)
    assert {(p["kd.regime"], p["kd.temperature"]) for p in points[1:]} == {
        ("soft", 2),
        ("soft", 4),
        ("mixed", 2),
        ("mixed", 4),
    }
    # a condition on a fixed key, and on an aliased entry's target key
    assert grid_point_list({"kd.temperature": SEARCH["kd.temperature"]}, {"kd.method": "none"}) == [{}]
    aliased = {
        "arm": {"key": "kd.method", "choices": ["none", "response"]},
        "kd.temperature": SEARCH["kd.temperature"],
    }
    assert len(grid_point_list(aliased)) == 3


def test_a_conditional_grid_trains_each_point_once(tmp_path, store, tiny_experiment, capsys):
    study = {
        "experiment": str(tiny_experiment),
        "sampler": {"name": "grid", "seed": 0},
        "fixed": {"train.epochs": 1},
        "search": {
            "kd.method": SEARCH["kd.method"],
            "kd.temperature": {"choices": [1, 4], "when": {"kd.method": "response"}},
        },
    }
    path = write_yaml(tmp_path / "studies" / "cond.yaml", study)
    assert load_study(path).budget.trials == 3
    assert main(["sweep", "--study", str(path), "--dry-run"]) == 0
    assert "the grid has 3 points" in capsys.readouterr().out
    journal = tmp_path / "journal.log"
    assert main(["sweep", "--study", str(path), "--storage", str(journal), "--quiet"]) == 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("cond").experiment_id])
    trained = sorted(
        (r.data.params["kd.method"], r.data.params.get("kd.temperature", "-"))
        for r in runs
        if r.data.tags.get("role") == "trial" and r.data.tags.get("state") == "finished"
    )
    assert trained == [("none", "-"), ("response", "1.0"), ("response", "4.0")]
