"""Bad input, counted: every kind below stops with one ``error:`` line naming the problem and the fix, no
traceback, and nothing in either store (no Optuna journal, no MLflow run). The exit status is 2, except for a
dataset that is missing or not laid out as expected: 3 (``DataError``, the code ``harness/errors.py`` gives
data problems and ``tests/test_train.py`` checks), so a script can tell "fix the file" from "fix the data".

| # | kind | input | what the line says |
|---|---|---|---|
| 1 | study file | missing file | file not found; check the path |
| 2 | study file | YAML syntax error | line N: not valid YAML; fix the syntax |
| 3 | study file | unknown top-level key | unknown key; remove it or check its spelling |
| 4 | study file | test metric as objective | the test split is never for choosing; use val/... |
| 5 | study file | range low above high | swap them |
| 6 | study file | `when` on a parameter neither searched nor fixed | names it |
| 7 | study file | `seeds` and a searched `train.seed` | drop one |
| 8 | study file | search key the experiment lacks | unknown key |
| 9 | study file | experiment file missing | point it at a file in experiments/ |
| 10 | study file | budget.trials 0 | >= 1 |
| 11 | study file | unknown sampler | tpe, random or grid |
| 12 | study file | empty choices | list at least one value |
| 13 | experiment file | missing file | file not found |
| 14 | experiment file | unknown model | lists the models |
| 15 | experiment file | negative epochs | >= 0 |
| 16 | experiment file | unknown KD method | lists the methods |
| 17 | experiment file | a list, not a mapping | expected a mapping |
| 18 | experiment file | unknown data source | lists the sources |
| 19 | CLI args | `--set` key the experiment lacks | unknown key |
| 20 | CLI args | `--set` without `=` | expected KEY=VALUE |
| 21 | data folder | root missing | the expected layout (exit 3: DataError) |
| 22 | data folder | no masks folder | the expected layout (exit 3) |
| 23 | data folder | images without masks of the same stem | names one (exit 3) |
| 24 | model weights | file missing | give a .pt/.pth/.safetensors state dict |
| 25 | model weights | not a state dict (garbage bytes) | not a plain state dict |
| 26 | model weights | state dict that does not fit | first missing / unexpected key |
| 27 | model weights | teacher checkpoint missing | give an existing .pt |
| 28 | CLI args | `--trials abc` | invalid int value |
| 29 | CLI args | unknown command | invalid choice |
| 30 | CLI args | `train` without `--config` | required |
| 31 | CLI args | server on 0.0.0.0 without logins | set MLFLOW_AUTH_ADMIN_PASSWORD or --insecure |
| 32 | CLI args | users CLI without an http(s) URL | give the server's URL |
| 33 | model weights | teacher checkpoint cut short (half its bytes) | not a kd-harness checkpoint, or a truncated one |
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from harness.cli import main
from tests.conftest import TINY_DATA, TINY_TRAIN

GOOD = {
    "name": "g",
    "data": TINY_DATA,
    "model": {"name": "unet", "width": 2, "depth": 3},
    "train": TINY_TRAIN,
}


def _study(exp: str, **kw) -> dict:
    return {
        "experiment": exp,
        "budget": {"trials": 1},
        "search": {"train.lr": {"low": 1e-3, "high": 1e-2}},
        **kw,
    }


def _with(**kw) -> dict:
    return {**GOOD, **kw}


def _model(**kw) -> dict:
    return _with(model={**GOOD["model"], **kw})


# name: (kind of file written to {tmp}/input.yaml or None, its content (a function of tmp), argv (a function of tmp and the file), the line's fragment)
CASES = {
    "study missing": (None, lambda t, f: ["sweep", "--study", f"{t}/nope.yaml"], "file not found"),
    "study yaml": ("search: [unclosed", lambda t, f: ["sweep", "--study", f], "not valid YAML"),
    "study unknown key": (
        lambda t: _study(f"{t}/exp.yaml", budgett={"trials": 1}),
        lambda t, f: ["sweep", "--study", f],
        "budgett: unknown key",
    ),
    "study test objective": (
        lambda t: _study(f"{t}/exp.yaml", objective={"metric": "test/miou"}),
        lambda t, f: ["sweep", "--study", f],
        "use val/miou",
    ),
    "study low above high": (
        lambda t: _study(f"{t}/exp.yaml", search={"train.lr": {"low": 1e-2, "high": 1e-3}}),
        lambda t, f: ["sweep", "--study", f],
        "swap them",
    ),
    "study when unknown": (
        lambda t: _study(
            f"{t}/exp.yaml",
            search={"train.lr": {"low": 1e-3, "high": 1e-2, "when": {"kd.method": "response"}}},
        ),
        lambda t, f: ["sweep", "--study", f],
        "neither searched nor fixed",
    ),
    "study seeds twice": (
        lambda t: _study(f"{t}/exp.yaml", seeds=[0, 1], search={"train.seed": {"choices": [0, 1]}}),
        lambda t, f: ["sweep", "--study", f],
        "seed would be set twice",
    ),
    "study unknown search key": (
        lambda t: _study(f"{t}/exp.yaml", search={"train.nonexistent": {"choices": [1, 2]}}),
        lambda t, f: ["sweep", "--study", f],
        "train.nonexistent: unknown key",
    ),
    "study experiment missing": (
        lambda t: _study(f"{t}/none.yaml"),
        lambda t, f: ["sweep", "--study", f],
        "point it at a file in experiments/",
    ),
    "study zero trials": (
        lambda t: _study(f"{t}/exp.yaml", budget={"trials": 0}),
        lambda t, f: ["sweep", "--study", f],
        "budget.trials",
    ),
    "study unknown sampler": (
        lambda t: _study(f"{t}/exp.yaml", sampler={"name": "bogus"}),
        lambda t, f: ["sweep", "--study", f],
        "'tpe', 'random' or 'grid'",
    ),
    "study empty choices": (
        lambda t: _study(f"{t}/exp.yaml", search={"model.width": {"choices": []}}),
        lambda t, f: ["sweep", "--study", f],
        "choices is empty",
    ),
    "experiment missing": (None, lambda t, f: ["train", "--config", f"{t}/nope.yaml"], "file not found"),
    "experiment unknown model": (
        lambda t: _with(model={"name": "resnet9000"}),
        lambda t, f: ["train", "--config", f],
        "unknown choice 'resnet9000'",
    ),
    "experiment negative epochs": (
        lambda t: _with(train={**TINY_TRAIN, "epochs": -1}),
        lambda t, f: ["train", "--config", f],
        "train.epochs",
    ),
    "experiment unknown kd": (
        lambda t: _with(kd={"method": "magic"}),
        lambda t, f: ["train", "--config", f],
        "unknown choice 'magic'",
    ),
    "experiment a list": ("- a\n- b\n", lambda t, f: ["train", "--config", f], "expected a mapping"),
    "experiment unknown source": (
        lambda t: _with(data={"source": "imagenet22k"}),
        lambda t, f: ["train", "--config", f],
        "unknown choice 'imagenet22k'",
    ),
    "set unknown key": (
        None,
        lambda t, f: ["train", "--config", f"{t}/exp.yaml", "--set", "train.epochz=2"],
        "train.epochz: unknown key",
    ),
    "set without equals": (
        None,
        lambda t, f: ["train", "--config", f"{t}/exp.yaml", "--set", "train.epochs"],
        "expected KEY=VALUE",
    ),
    "folder root missing": (
        lambda t: _with(data={"source": "folder", "root": f"{t}/nofolder", "num_classes": 2}),
        lambda t, f: ["train", "--config", f],
        "data.root not found",
    ),
    "folder no masks": (
        lambda t: _with(data={"source": "folder", "root": f"{t}/nomasks", "num_classes": 2}),
        lambda t, f: ["train", "--config", f],
        "masks folder not found",
    ),
    "folder stems differ": (
        lambda t: _with(data={"source": "folder", "root": f"{t}/stems", "num_classes": 2}),
        lambda t, f: ["train", "--config", f],
        "have no mask",
    ),
    "weights missing": (
        lambda t: _model(weights=f"{t}/no.pt"),
        lambda t, f: ["train", "--config", f],
        "not found; give the path",
    ),
    "weights garbage": (
        lambda t: _model(weights=f"{t}/garbage.pt"),
        lambda t, f: ["train", "--config", f],
        "is not a plain state dict",
    ),
    "weights do not fit": (
        lambda t: _model(weights=f"{t}/wrong.pt"),
        lambda t, f: ["train", "--config", f],
        "does not fit the model",
    ),
    "teacher checkpoint missing": (
        lambda t: _with(kd={"method": "response"}, teacher=f"{t}/no_teacher.pt"),
        lambda t, f: ["train", "--config", f],
        "teacher checkpoint",
    ),
    "teacher checkpoint truncated": (
        lambda t: _with(kd={"method": "response"}, teacher=f"{t}/half.pt"),
        lambda t, f: ["train", "--config", f],
        "or a truncated one",
    ),
    "trials not an int": (
        None,
        lambda t, f: ["sweep", "--study", f"{t}/exp.yaml", "--trials", "abc"],
        "invalid int value",
    ),
    "unknown command": (None, lambda t, f: ["fly"], "invalid choice: 'fly'"),
    "train without config": (None, lambda t, f: ["train"], "required: --config"),
}
DATA_ERRORS = {"folder root missing", "folder no masks", "folder stems differ"}  # exit 3, see above


@pytest.fixture
def inputs(tmp_path, store):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "nomasks" / "images" / "a.png")
    for sub, stem in (("images", "a"), ("masks", "b")):
        (tmp_path / "stems" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "stems" / sub / f"{stem}.png")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"nope.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    whole = io.BytesIO()
    torch.save({"config": GOOD, "state_dict": {"w": torch.zeros(256)}}, whole)
    (tmp_path / "half.pt").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    return tmp_path


def nothing_stored(folder, store: str) -> None:
    assert not [p for p in folder.rglob("*.log") if "journal" in p.name], "an Optuna journal was written"
    db = store.removeprefix("sqlite:///")
    if __import__("os").path.exists(db):
        client = MlflowClient(store)
        ids = [e.experiment_id for e in client.search_experiments()]
        assert client.search_runs(ids) == [], "an MLflow run was logged"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, inputs, store, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    content, argv, fragment = CASES[name]
    path = str(inputs / "input.yaml")
    if content is not None:
        data = content(inputs) if callable(content) else content
        (inputs / "input.yaml").write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    try:
        code = main(argv(inputs, path))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err
    assert len(errors) == 1 and fragment in errors[0], err[-1500:]
    nothing_stored(inputs, store)
    assert code == (3 if name in DATA_ERRORS else 2), errors[0]


def test_server_and_users_cli_arguments(tmp_path, capsys, monkeypatch):
    from harness.tracking import server, users

    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    assert server.main(["--backend", f"sqlite:///{tmp_path}/m.db", "--host", "0.0.0.0"]) == 2
    assert users.main(["--tracking-uri", "sqlite:///x.db", "remove", "bob"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--insecure" in lines[0] and "give the server's http(s) URL" in lines[1]
    assert not (tmp_path / "m.db").exists()
