"""The CIRKD protocol as shipped: the train/val hold-out split mode (VOC, Cityscapes) on fake trees, the
poly schedule and iteration budget, and the experiment and study files validated without data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from harness.cli import main as harness_main
from harness.config import build_experiment, load_experiment
from harness.data import load_data
from harness.data._splits import holdout_groups, spread_holdout
from harness.engine.compute import Meter, StepCost
from harness.engine.fit import build_optimizer, fit, step_lr
from harness.engine.run import build_distiller
from harness.engine.teacher import check_normalization, teacher_config
from harness.errors import ConfigError, DataError
from harness.models import build_model
from tests.conftest import TINY_DATA, write_yaml
from tests.test_data_sources import cfg, cityscapes_names, make_cityscapes, make_voc

ROOT = Path(__file__).resolve().parents[1]
CITYSCAPES = sorted((ROOT / "experiments" / "cityscapes").glob("*.yaml"))
STUDY = ROOT / "studies" / "cityscapes_reference.yaml"
CPU = torch.device("cpu")

# ---------------------------------------------------------------- split: train_holdout


def test_spread_and_group_holdouts():
    assert spread_holdout(7, 0.3) == ([0, 1, 2, 4, 5], [3, 6])
    kept, held = spread_holdout(1464, 0.15)  # VOC train.txt
    assert len(held) == 219 and len(kept) == 1245 and max(b - a for a, b in zip(held, held[1:])) <= 7
    # Cityscapes train: per-city image counts of the official set (2,975 images)
    counts = {"aachen": 174, "bochum": 96, "bremen": 316, "cologne": 154, "darmstadt": 85, "dusseldorf": 221,
              "erfurt": 109, "hamburg": 248, "hanover": 196, "jena": 119, "krefeld": 99,
              "monchengladbach": 94, "strasbourg": 365, "stuttgart": 196, "tubingen": 144, "ulm": 95,
              "weimar": 142, "zurich": 122}  # fmt: skip
    cities = [c for c, n in counts.items() for _ in range(n)]
    kept, held = holdout_groups(cities, 0.15)
    assert {cities[i] for i in held} == {"darmstadt", "monchengladbach", "ulm", "bochum", "krefeld"}
    assert (
        len(held) == 469 and len(kept) == 2506 and not {cities[i] for i in held} & {cities[i] for i in kept}
    )
    # the shipped experiments name the same cities
    assert load_experiment(CITYSCAPES[0]).data.holdout_cities == sorted(
        {cities[i] for i in held}, key=lambda c: counts[c]
    )
    assert holdout_groups(["a", "a", "b"], 0.9) == ([0, 1], [2])  # the largest city always trains


def test_voc_train_holdout_selects_on_train_and_tests_on_all_of_val(tmp_path):
    train = tuple(f"2007_{k:06d}" for k in range(7))
    val = ("2008_000001", "2008_000002", "2009_000001")
    masks = make_voc(tmp_path, train=train, val=val)
    splits = load_data(
        cfg("voc", root=str(tmp_path), split="train_holdout", holdout_fraction=0.3, augment={"resize": None})
    )
    names = lambda split: [Path(split.base.images[j]).stem for j in split.indices]  # noqa: E731
    assert names(splits.val) == ["2007_000003", "2007_000006"]
    assert names(splits.train) == ["2007_000000", "2007_000001", "2007_000002", "2007_000004", "2007_000005"]
    assert names(splits.test) == list(val)
    x, y = splits.val[1]
    assert torch.equal(y, torch.from_numpy(masks["2007_000006"]).long()) and x.shape == (3, 10, 14)
    default = cfg("voc", root=str(tmp_path))
    assert "split" not in default.model_dump() and "holdout_fraction" not in default.model_dump()


LAYOUT = {
    "train": {"aachen": 4, "bochum": 1, "bremen": 2, "ulm": 1},
    "val": {"frankfurt": 2, "lindau": 1, "munster": 1},
}


def test_cityscapes_train_holdout_holds_out_whole_train_cities_and_tests_on_all_of_val(tmp_path):
    make_cityscapes(tmp_path, LAYOUT)
    c = cfg("cityscapes", root=str(tmp_path), split="train_holdout", holdout_fraction=0.25)
    splits = load_data(c.model_copy(update={"augment": c.augment.model_copy(update={"resize": None})}))
    city = lambda split: sorted({n.split("_")[0] for n in cityscapes_names(split)})  # noqa: E731
    assert city(splits.val) == ["bochum", "ulm"]  # smallest first, 2 of 8 images
    assert city(splits.train) == ["aachen", "bremen"] and len(splits.train) == 6
    assert city(splits.test) == ["frankfurt", "lindau", "munster"] and len(splits.test) == 4
    _, y = splits.val[0]
    assert set(y.unique().tolist()) <= {0, 1, 11, 13, 18, 255}  # labelIds mapped to train ids
    named = load_data(
        cfg("cityscapes", root=str(tmp_path), split="train_holdout", holdout_cities=["bremen"],
            augment={"resize": None})
    )  # fmt: skip
    assert city(named.val) == ["bremen"] and len(named.train) == 6 and len(named.test) == 4


def test_cityscapes_holdout_mistakes_are_one_line(tmp_path):
    make_cityscapes(tmp_path, LAYOUT)
    with pytest.raises(DataError) as err:
        load_data(cfg("cityscapes", root=str(tmp_path), split="train_holdout", holdout_cities=["zurich"]))
    msg = str(err.value)
    assert "holdout_cities names zurich" in msg and "aachen, bochum, bremen, ulm" in msg and "\n" not in msg
    with pytest.raises(DataError, match="one held out and one left"):
        load_data(
            cfg("cityscapes", root=str(tmp_path), split="train_holdout",
                holdout_cities=["aachen", "bochum", "bremen", "ulm"])
        )  # fmt: skip
    with pytest.raises(ValidationError, match="holdout_cities needs split: train_holdout"):
        cfg("cityscapes", root=str(tmp_path), holdout_cities=["ulm"])
    make_cityscapes(tmp_path / "one", {"train": {"aachen": 2}, "val": {"lindau": 1}})
    with pytest.raises(DataError, match="1 train city"):
        load_data(cfg("cityscapes", root=str(tmp_path / "one"), split="train_holdout"))


def test_shipped_data_block_on_a_fake_tree_gives_padded_crops_and_whole_eval_images(tmp_path):
    make_cityscapes(tmp_path, {**LAYOUT, "train": {"aachen": 2, "bochum": 1, "darmstadt": 1, "ulm": 1}})
    data = load_experiment(CITYSCAPES[0]).data.model_dump(mode="json")
    data["root"] = str(tmp_path)
    data["holdout_cities"] = ["darmstadt", "ulm"]
    data["augment"]["crop"] = [24, 40]  # the fake images are 8x16, at most 16x32 scaled: crops pad
    splits = load_data(cfg("cityscapes", **{k: v for k, v in data.items() if k != "source"}))
    assert splits.sizes() == {"train": 3, "val": 2, "test": 4} and not splits.train.deterministic
    torch.manual_seed(0)
    for i in range(3):
        x, y = splits.train[i]
        assert x.shape == (3, 24, 40) and y.shape == (24, 40)
        pad = (x.abs() < 0.01).all(dim=0)  # mean-colour padding reads 0 once normalised ...
        assert pad.sum() >= 24 * 40 - 16 * 32 and (y[pad] == 255).all()  # ... and is labelled ignore
    x, y = splits.test[0]
    assert x.shape == (3, 8, 16) and y.shape == (8, 16)  # full resolution, uncropped


# ---------------------------------------------------------------- poly schedule, iterations, SGD


def tiny(train: dict):
    data = {**TINY_DATA, "image_size": 16}  # 48 training canvases
    return build_experiment(
        {"name": "t", "data": data, "model": {"name": "unet", "width": 2, "depth": 3}, "train": train}, "test"
    )


def test_poly_lr_after_n_steps_is_lr0_times_one_minus_n_over_total_to_the_power():
    cfg = tiny({"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "scheduler": "poly"})
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg.train)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    total = 25
    meter = Meter(None, StepCost(0.0), [1] * total, [False], CPU)
    set_lr = step_lr(opt, cfg.train, meter, total)
    assert opt.param_groups[0]["lr"] == 0.02  # before the first step: lr0
    for n in range(1, total + 1):
        meter.add(1)
        set_lr()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - n / total) ** 0.9, rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["lr"] == 0.0
    other = tiny({"scheduler": "poly", "power": 2.0}).train
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(1))], other)
    m2 = Meter(None, StepCost(0.0), [1] * 4, [False], CPU)
    f = step_lr(opt2, other, m2, 4)
    m2.add(1)
    f()
    assert opt2.param_groups[0]["lr"] == pytest.approx(other.lr * 0.75**2)


def test_iterations_train_exactly_that_many_steps_with_poly_per_step():
    cfg = tiny({"iterations": 7, "batch_size": 16, "lr": 0.01, "optimizer": "sgd", "scheduler": "poly"})
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    result = fit(model, data, cfg, device=CPU, distiller=build_distiller(cfg, model, None, data, CPU))
    assert result.compute["train_steps"] == 7  # 3 + 3 + 1 steps: the third pass cut short
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.01 * (1 - 3 / 7) ** 0.9)
    assert lrs[1] == pytest.approx(0.01 * (1 - 6 / 7) ** 0.9)
    assert lrs[2] == 0.0
    assert cfg.train.epochs == 8  # the default, not used


def test_iteration_and_poly_fields_keep_old_hashes_and_refuse_contradictions():
    dumped = tiny({}).model_dump()["train"]
    assert "iterations" not in dumped and "power" not in dumped
    assert tiny({"iterations": 5}).hash() != tiny({}).hash()
    assert tiny({"scheduler": "poly"}).model_dump()["train"]["power"] == 0.9
    with pytest.raises(ConfigError, match="train.iterations trains but train.epochs 0"):
        tiny({"iterations": 100, "epochs": 0})
    with pytest.raises(ConfigError, match="train.scheduler"):
        tiny({"scheduler": "polynomial"})


# ---------------------------------------------------------------- shipped files


def test_shipped_cityscapes_experiments_follow_the_cirkd_protocol():
    assert [p.name for p in CITYSCAPES] == [
        "deeplabv3_mobilenetv2.yaml",
        "deeplabv3_r101.yaml",
        "deeplabv3_r18.yaml",
    ]
    by_name = {p.stem: load_experiment(p) for p in CITYSCAPES}
    teacher = teacher_config(str(ROOT / "experiments/cityscapes/deeplabv3_r101.yaml"))
    assert teacher.train.epochs == 0 and teacher.model.weights.endswith(".pt")
    assert (teacher.model.arch, teacher.model.encoder) == ("DeepLabV3", "resnet101")
    for name, encoder in (("deeplabv3_r18", "resnet18"), ("deeplabv3_mobilenetv2", "mobilenet_v2")):
        exp = by_name[name]
        assert (exp.model.arch, exp.model.encoder, exp.model.encoder_weights) == (
            "DeepLabV3",
            encoder,
            "imagenet",
        )
        t = exp.train
        assert (t.iterations, t.batch_size, t.optimizer, t.lr) == (40000, 16, "sgd", 0.02)
        assert (t.momentum, t.weight_decay, t.scheduler, t.power) == (0.9, 1e-4, "poly", 0.9)
        assert exp.teacher == "experiments/cityscapes/deeplabv3_r101.yaml"
        # the teacher's data block exactly, so inputs are normalised the same (the run checks it too)
        assert exp.data.model_dump() == teacher.data.model_dump()
        check_normalization(exp.teacher, teacher.model_dump(mode="json"), exp.data.model_dump(mode="json"), 3)
    a = teacher.data.augment
    assert (a.resize, a.scale, a.scale_step, a.crop, a.hflip, a.crop_eval) == (
        None, (0.5, 2.0), 0.1, (512, 1024), True, False
    )  # fmt: skip
    assert teacher.data.split == "train_holdout" and a.random and not a.fixed_size


def test_reference_study_validates_without_data_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    store, journal = tmp_path / "mlruns", tmp_path / "journal.log"
    args = ["sweep", "--study", str(STUDY), "--dry-run", "--tracking-uri", f"sqlite:///{store}/m.db"]
    assert harness_main([*args, "--storage", str(journal)]) == 0
    out = capsys.readouterr().out
    assert "study cityscapes_reference: valid (6 example configurations" in out and "nothing" in out
    assert not store.exists() and not journal.exists() and not (ROOT / "data" / "cityscapes").exists()


def test_dry_run_reports_a_broken_study_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = write_yaml(
        tmp_path / "bad.yaml",
        {
            "experiment": "experiments/cityscapes/deeplabv3_r18.yaml",
            "objective": {"metric": "val/miou", "direction": "maximize"},
            "budget": {"trials": 1},
            "fixed": {"data.augment.scale": [2.0, 0.5]},
            "search": {"kd.method": {"choices": ["none"]}},
        },
    )
    assert harness_main(["sweep", "--study", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.augment.scale" in err and "0 < low <= high" in err and len(err.splitlines()) == 1


def test_protocol_trains_from_the_cli_on_a_fake_tree_with_a_live_teacher(tmp_path):
    """The student file's data and schedule (tiny models, 7 iterations), CWD from a teacher: random crops
    mean the teacher runs live; poly per step; val on held-out train cities, test on all of val."""
    from mlflow.tracking import MlflowClient

    make_cityscapes(tmp_path / "cs", {"train": {"aachen": 4, "bochum": 2, "ulm": 2}, "val": LAYOUT["val"]})
    student = load_experiment(ROOT / "experiments/cityscapes/deeplabv3_r18.yaml").model_dump(mode="json")
    student["data"].update(root=str(tmp_path / "cs"), holdout_cities=["ulm"])
    student["data"]["augment"]["crop"] = [16, 32]
    student["model"] = {"name": "unet", "width": 2, "depth": 2}
    student["train"].update(iterations=7, batch_size=2)
    teacher = {**student, "name": "cs_teacher", "model": {"name": "unet", "width": 4, "depth": 2}}
    teacher["train"] = {**student["train"], "iterations": 3}
    student.update(teacher=str(write_yaml(tmp_path / "teacher.yaml", teacher)), kd={"method": "cwd"})
    uri = f"sqlite:///{tmp_path}/mlruns/m.db"
    args = ["train", "--config", str(write_yaml(tmp_path / "student.yaml", student)), "--quiet"]
    assert harness_main([*args, "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.data.params.get("kd.method") == "cwd")
    assert run.data.metrics["train_steps"] == 7 and run.data.tags["teacher.outputs"].startswith("live")
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([0.02 * (1 - 3 / 7) ** 0.9, 0.02 * (1 - 6 / 7) ** 0.9, 0.0])
    assert run.data.metrics["train/cwd"] > 0 and 0 <= run.data.metrics["test/miou"] <= 1
