"""Equal compute: training FLOPs counted per step (3 x forward per image, plus KD), budgets that end training
with the learning rate laid over them, their config errors, and the report's at-equal-compute table from a
tiny real study."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from harness.cli import main as harness_main
from harness.config import build_experiment
from harness.data import load_data
from harness.engine.compute import measure_step_cost
from harness.engine.evaluate import count_flops
from harness.engine.fit import fit
from harness.engine.run import build_distiller
from harness.engine.teacher import freeze, serve_teacher
from harness.errors import ConfigError, HarnessError
from harness.models import build_model
from harness.report.__main__ import main as report_main
from tests.conftest import TINY_DATA, write_yaml

CPU = torch.device("cpu")
DATA = {**TINY_DATA, "image_size": 16}  # 48 training canvases
STUDENT = {"name": "unet", "width": 2, "depth": 3}
TEACHER = {"name": "unet", "width": 4, "depth": 3}


def config(budget=None, epochs=10, batch_size=16, train=None, **more):
    train = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": 0.01,
        "scheduler": "cosine",
        "budget": budget,
        **(train or {}),
    }
    return build_experiment({"name": "t", "data": DATA, "model": STUDENT, "train": train, **more}, "test")


def analytic_forward_flops(model: nn.Module, size: int) -> int:
    """2 x multiply-adds of every convolution for one image, from the layer shapes alone."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):  # each input pixel spreads Cin x Cout x k x k products
            total += 2 * module.weight.numel() * inputs[0].shape[-2] * inputs[0].shape[-1]
        elif isinstance(module, nn.Conv2d):  # each output pixel gathers Cin x k x k products per channel
            total += 2 * module.weight.numel() * output.shape[-2] * output.shape[-1]

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    for h in handles:
        h.remove()
    return total


def train(cfg):
    """Fit the student as a run does: the distiller, a random frozen teacher when KD is on, the step cost."""
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    teacher = server = None
    if cfg.kd.method != "none":
        teacher = freeze(build_model(cfg_model(TEACHER), data.in_channels, data.num_classes))
    distiller = build_distiller(cfg, model, teacher, data, CPU)
    if teacher is not None:
        no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        server, _ = serve_teacher(teacher, distiller.teacher_layers, data, cfg.train, CPU, no_amp, ("test",))
    cost = measure_step_cost(model, distiller, server, teacher, data, cfg.train.batch_size, CPU)
    result = fit(model, data, cfg, device=CPU, distiller=distiller, teacher=server, cost=cost)
    return result, cost, model, teacher


def cfg_model(spec):
    return build_experiment({"name": "m", "data": DATA, "model": spec}, "test").model


def test_train_flops_are_three_forwards_per_training_image():
    result, cost, model, _ = train(config(epochs=2))
    forward = analytic_forward_flops(model, 16)
    assert count_flops(model, torch.zeros(1, 1, 16, 16)) == forward
    assert cost.student == 3 * forward and cost.kd == 0
    # 48 images in batches of 16: 3 steps per epoch, 2 epochs
    assert result.compute["train_steps"] == 6
    assert result.compute["train_flops"] == 3 * forward * 16 * 6
    assert result.compute["train_seconds"] > 0 and "budget_spent" not in result.compute


def test_flops_budget_buys_whole_steps_and_the_cosine_ends_with_it():
    model = build_model(cfg_model(STUDENT), 1, 11)
    step = 3 * analytic_forward_flops(model, 16) * 16
    result, _, _, _ = train(config({"flops": 7.5 * step}, epochs=10))
    assert result.compute["train_steps"] == 7  # the eighth step would overrun the budget
    assert result.compute["train_flops"] == 7 * step
    assert result.compute["budget_spent"] == pytest.approx(7 / 7.5)
    assert len(result.history) == 3  # 3 + 3 + 1 steps; validated after the partial epoch too
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert lrs[1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_equal_flops_budget_for_two_methods_takes_different_steps():
    teacher_forward = analytic_forward_flops(build_model(cfg_model(TEACHER), 1, 11), 16)
    step = 3 * analytic_forward_flops(build_model(cfg_model(STUDENT), 1, 11), 16) * 8
    budget = {"flops": 60.5 * step}
    plain, _, _, _ = train(config(budget, epochs=50, batch_size=8))
    # a live teacher (no cache) and fitnet's regressor make each KD step dearer
    kd_cfg = config(
        budget, 50, 8, train={"teacher_cache": False}, kd={"method": "fitnet"}, teacher="not_loaded.yaml"
    )
    fitnet, cost, _, _ = train(kd_cfg)
    assert cost.kd > teacher_forward  # the teacher's forward plus the regressor's forward and backward
    assert plain.compute["train_steps"] == 60 and fitnet.compute["train_steps"] < 40
    assert len(fitnet.history) < len(plain.history)
    flops = [plain.compute["train_flops"], fitnet.compute["train_flops"]]
    assert max(flops) / min(flops) < 1.05 and max(flops) <= budget["flops"]


def test_seconds_budget_stops_training():
    result, _, _, _ = train(config({"seconds": 0.3}, epochs=10_000))
    assert 1.0 <= result.compute["budget_spent"] < 10
    assert result.compute["train_seconds"] >= 0.3 and len(result.history) < 10_000
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "budget, message",
    [
        ({}, "train.budget: Value error, give exactly one of flops or seconds"),
        ({"flops": 1e9, "seconds": 10}, "train.budget: Value error, give exactly one of flops or seconds"),
        ({"flops": 0}, "train.budget.flops: Input should be greater than 0"),
        ({"seconds": -1}, "train.budget.seconds: Input should be greater than 0"),
        ({"minutes": 3}, "train.budget.minutes: unknown key"),
    ],
)
def test_bad_budget_is_a_one_line_error(budget, message):
    with pytest.raises(ConfigError) as exc:
        config(budget)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_budget_smaller_than_one_step_is_a_clear_error():
    with pytest.raises(HarnessError, match=r"buys no training step .*; raise it"):
        train(config({"flops": 10.0}))


def test_report_shows_the_equal_compute_table(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    data = {**TINY_DATA, "image_size": 16}
    teacher = write_yaml(
        tmp_path / "teacher.yaml",
        {"name": "tiny_teacher", "data": data, "model": TEACHER, "train": {"epochs": 1, "batch_size": 16}},
    )
    student = write_yaml(
        tmp_path / "student.yaml",
        {"name": "tiny_student", "data": data, "model": STUDENT, "train": {"epochs": 8, "batch_size": 16}},
    )
    step = 3 * analytic_forward_flops(build_model(cfg_model(STUDENT), 1, 11), 16) * 16
    study = write_yaml(
        tmp_path / "eq.yaml",
        {
            "experiment": str(student),
            "teacher": str(teacher),
            "objective": {"metric": "val/miou", "direction": "maximize"},
            "budget": {"trials": 2},
            "sampler": {"name": "grid", "seed": 0},
            "seeds": [0, 1],
            "fixed": {"train.budget.flops": 9.5 * step},
            "search": {"kd.method": {"choices": ["none", "fitnet"]}},
        },
    )
    sweep = ["sweep", "--study", str(study), "--storage", str(tmp_path / "j.log"), "--tracking-uri", uri]
    assert harness_main([*sweep, "--quiet"]) == 0
    assert report_main(["--study", "eq", "--out", str(tmp_path / "reports"), "--tracking-uri", uri]) == 0
    table = pd.read_csv(tmp_path / "reports" / "eq" / "equal_compute.csv")
    assert list(table["KD method"]) == ["none", "fitnet"]
    assert list(table["test mIoU n"]) == [2, 2]
    assert table.loc[0, "steps"] == 9 and table.loc[0, "epochs run"] == 3  # 3 steps per epoch
    assert table["train FLOPs"].max() / table["train FLOPs"].min() < 1.05
    assert (table["budget spent"] <= 1).all()
    # fitnet's seed 0 built the teacher cache, seed 1 reused it: its cost is shared by the two runs
    cache = 48 * analytic_forward_flops(build_model(cfg_model(TEACHER), 1, 11), 16)
    assert list(table["teacher cache share (FLOPs)"]) == [0, pytest.approx(cache / 2)]
    readme = (tmp_path / "reports" / "eq" / "README.md").read_text()
    assert "At equal compute" in readme and "within" in readme
