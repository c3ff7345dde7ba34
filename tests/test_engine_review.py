"""Engine fixes from review issue 21: the selection metric, teacher-cache accounting, KD FLOPs, timing tags,
the fp32 CPU cache, dead teacher runs, per-class IoU, teacher lookup, and the trivial predictor's score."""

from __future__ import annotations

import pytest
import torch

from harness.config import build_experiment
from harness.data import load_data
from harness.distill import KD_METHODS
from harness.engine import fit as fit_module
from harness.errors import ConfigError
from harness.models import build_model
from tests.conftest import TINY_DATA, TINY_TRAIN


def experiment(train: dict | None = None, **extra):
    tree = {
        "name": "t",
        "data": TINY_DATA,
        "model": {"name": "unet", "width": 2, "depth": 3},
        "train": {**TINY_TRAIN, **(train or {})},
        **extra,
    }
    return build_experiment(tree, "t")


# --- item 5: the best epoch, early stopping and plateau follow train.select_on ---------------------------


def test_select_on_rejects_an_unknown_metric_in_one_line():
    with pytest.raises(ConfigError) as err:
        experiment({"select_on": "val/iou"})
    message = str(err.value)
    assert "\n" not in message and "train.select_on" in message and "'val/loss'" in message


def test_select_on_must_be_logged_by_the_task():
    cfg = experiment({"select_on": "val/accuracy"})
    with pytest.raises(ConfigError, match="segmentation runs log"):
        fit_module.selection(cfg.train, "segmentation")


def test_select_on_unset_keeps_the_config_hash():
    # computed before select_on existed: teachers trained then are still found by their hash
    cfg = experiment(model={"name": "unet", "width": 4, "depth": 3})
    assert cfg.hash() == "2cf6a2012e61168f"
    assert experiment({"select_on": "val/loss"}).hash() != experiment().hash()


def scripted_fit(monkeypatch, train: dict, vals: list[dict]):
    """Fit a tiny UNet for real, with validation results replaced by ``vals`` (one dict per epoch)."""
    cfg = experiment({"epochs": len(vals), **train})
    data = load_data(cfg.data)
    script = iter(vals)
    monkeypatch.setattr(fit_module, "validate", lambda *a, **k: {"pixel_acc": 0.5, **next(script)})
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    distiller = KD_METHODS.build(cfg.kd)
    return fit_module.fit(model, data, cfg, device=torch.device("cpu"), distiller=distiller)


VALS = [
    {"miou": 0.1, "loss": 1.0},
    {"miou": 0.5, "loss": 0.9},
    {"miou": 0.3, "loss": 0.5},
    {"miou": 0.2, "loss": 0.8},
]


@pytest.mark.parametrize(("select_on", "best"), [(None, 1), ("val/miou", 1), ("val/loss", 2)])
def test_best_epoch_follows_select_on(monkeypatch, select_on, best):
    result = scripted_fit(monkeypatch, {"select_on": select_on}, VALS)
    assert result.best_epoch == best and result.best_val["loss"] == VALS[best]["loss"]


def test_early_stopping_follows_select_on(monkeypatch):
    # the loss gets worse at epoch 1 while mIoU improves: selecting on the loss stops there
    vals = [{"miou": 0.1, "loss": 1.0}, {"miou": 0.2, "loss": 1.1}, {"miou": 0.3, "loss": 1.2}]
    by_loss = scripted_fit(monkeypatch, {"select_on": "val/loss", "early_stopping": 1}, vals)
    by_miou = scripted_fit(monkeypatch, {"early_stopping": 1}, vals)
    assert len(by_loss.history) == 2 and by_loss.best_epoch == 0
    assert len(by_miou.history) == 3 and by_miou.best_epoch == 2


def test_plateau_scheduler_follows_select_on(monkeypatch):
    # a falling loss is progress when minimised: the learning rate stays; a flat mIoU is a plateau
    vals = [{"miou": 0.2, "loss": 1.0 - 0.1 * e} for e in range(5)]
    by_loss = scripted_fit(monkeypatch, {"scheduler": "plateau", "select_on": "val/loss"}, vals)
    by_miou = scripted_fit(monkeypatch, {"scheduler": "plateau"}, vals)
    assert [h["lr"] for h in by_loss.history] == [TINY_TRAIN["lr"]] * 5
    assert by_miou.history[-1]["lr"] < TINY_TRAIN["lr"]
