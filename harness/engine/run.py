"""Run one experiment end to end: data, teacher, student, KD method, fit, final evaluation, MLflow run.

Both ``python -m harness train`` and every trial of a study go through ``run_experiment``. Inputs are
checked (data loaded, student built with its weights, teacher resolved, KD method built) before a run is
created, so bad input leaves nothing half-written in the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.config import ExperimentConfig
from harness.data import load_data
from harness.data.base import DataSplits, TensorSplit
from harness.data.device_augment import augment_in_memory
from harness.distill import KD_METHODS
from harness.engine import distributed
from harness.engine.compute import first_batch, measure_step_cost, teacher_cache_flops
from harness.engine.evaluate import count_flops, evaluate, ms_per_image, timing_tag, trivial_score
from harness.engine.fit import FitResult, autocast_factory, eval_batch_size, fit, resolve_device, selection
from harness.engine.teacher import (
    CHECKPOINT_NAME,
    CHECKPOINT_TAG,
    checkpoint_payload,
    find_teacher,
    freeze,
    is_checkpoint,
    load_teacher,
    save_checkpoint,
    serve_teacher,
)
from harness.engine.visualize import prediction_grid
from harness.errors import HarnessError
from harness.models import build_model, count_parameters
from harness.models.taps import probe_shapes
from harness.tracking import Run, Tracker
from harness.tracking.mlflow_store import Heartbeat
from harness.tracking.provenance import process_tags, provenance_tags


@dataclass
class Outcome:
    run_id: str
    state: str  # finished, diverged, pruned, failed, interrupted
    metrics: dict[str, float] = field(default_factory=dict)
    compute_seconds: float = 0.0  # training and evaluation steps, teacher caching, final test evaluation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore Python's, NumPy's and torch's random states on exit."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])


_DATA: dict[str, DataSplits] = {}
_TRIVIAL: dict[str, dict[str, float]] = {}


def _data_key(cfg: ExperimentConfig, device: torch.device) -> str:
    return json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True) + str(device)


def cached_data(cfg: ExperimentConfig, device: torch.device) -> DataSplits:
    """Load a dataset once per process (a study's trials share it); in-memory splits move to the device."""
    key = _data_key(cfg, device)
    if key not in _DATA:
        data = load_data(cfg.data)
        for name in ("train", "val", "test"):
            split = getattr(data, name)
            if isinstance(split, TensorSplit):
                setattr(data, name, split.to(device))
        data = augment_in_memory(data, getattr(cfg.data, "augment", None))  # random views on the device
        _DATA.clear()
        _DATA[key] = data
    return _DATA[key]


def cached_trivial_score(cfg: ExperimentConfig, data: DataSplits, device: torch.device) -> dict[str, float]:
    """:func:`trivial_score` of the run's data, computed once per process."""
    key = _data_key(cfg, device)
    if key not in _TRIVIAL:
        _TRIVIAL.clear()
        _TRIVIAL[key] = trivial_score(data, device)
    return _TRIVIAL[key]


def build_distiller(cfg: ExperimentConfig, student, teacher, data: DataSplits, device):
    distiller = KD_METHODS.build(cfg.kd)
    if teacher is None:
        return distiller
    try:
        distiller.choose_layers(getattr(student, "kd_layers", []), getattr(teacher, "kd_layers", []))
        example = (
            data.train[: min(2, len(data.train))][0]
            if isinstance(data.train, TensorSplit)
            else torch.stack([data.train[i][0] for i in range(2)])
        )
        example = example.to(device)
        distiller.setup(
            probe_shapes(student, distiller.student_layers, example),
            probe_shapes(teacher, distiller.teacher_layers, example),
        )
        distiller.check_classes(data.num_classes)
    except ValueError as exc:
        raise HarnessError(f"kd.method '{cfg.kd.method}': {exc}") from None
    return distiller.to(device)


@dataclass
class Prepared:
    """What a run trains and how, checked before its MLflow run is created."""

    device: torch.device
    data: DataSplits
    model: torch.nn.Module
    distiller: torch.nn.Module
    autocast: Callable
    teacher: torch.nn.Module | None = None
    server: Callable | None = None  # serves the teacher's outputs (live or cached)
    served: str = ""  # how: live, cached, cached (reused), ...
    teacher_tags: dict[str, str] = field(default_factory=lambda: {"teacher.source": "none"})
    cache_seconds: float = 0.0


def prepare(cfg: ExperimentConfig, tracker: Tracker) -> Prepared:
    """Data, student, teacher (found or trained), KD method and the teacher's server, on the device.
    Launched by torchrun, the process joins its group first (engine/distributed.py)."""
    ctx = distributed.setup(cfg.train.device)
    device = distributed.place(resolve_device(cfg.train.device), ctx)
    distributed.check(cfg.train, ctx, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    seed_everything(cfg.train.seed)
    data = cached_data(cfg, device)
    selection(cfg.train, data.task)  # a select_on the task does not log stops the run before it starts
    seed_everything(cfg.train.seed)
    # The student (with its model.weights) is built before a teacher is found or trained, so a bad student
    # stops the run with nothing logged, not even a teacher run.
    model = build_model(cfg.model, data.in_channels, data.num_classes).to(device)
    teacher = teacher_cfg = None
    teacher_tags = {"teacher.source": "none"}
    if cfg.teacher and cfg.kd.method != "none":
        with preserved_rng(device), distributed.main_first(ctx):  # the student's draws stay unchanged
            if ctx.active and ctx.main and not is_checkpoint(cfg.teacher):
                untrained_teacher(cfg.teacher, tracker)
            teacher, teacher_tags, teacher_cfg = load_teacher(cfg.teacher, tracker, device, data, cfg.data)
    if device.type == "cuda" and cfg.train.channels_last and data.task == "segmentation":
        model = model.to(memory_format=torch.channels_last)
    distiller = build_distiller(cfg, model, teacher, data, device)
    if cfg.train.compile:
        model.compile()  # in place: parameter names and the checkpoint stay those of the plain model
    autocast = autocast_factory(device, cfg.train.amp)
    prepared = Prepared(device, data, model, distiller, autocast, teacher, teacher_tags=teacher_tags)
    if teacher is not None:
        start = time.perf_counter()
        key = (
            json.dumps(teacher_cfg, sort_keys=True),
            json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True),
        )
        prepared.server, prepared.served = serve_teacher(
            freeze(teacher), distiller.teacher_layers, data, cfg.train, device, prepared.autocast, key
        )
        prepared.cache_seconds = time.perf_counter() - start
        replay = getattr(prepared.server, "split", None)  # replayed views: train on the stored views
        if replay is not None:
            prepared.data = dataclasses.replace(data, train=replay)
    return prepared


def untrained_teacher(spec: str, tracker: Tracker) -> None:
    """Processes of a group do not train a teacher (rank 0 alone would wait on the others): it must exist."""
    if find_teacher(spec, tracker) is None:
        raise HarnessError(
            f"teacher {spec} has no finished run in {tracker.uri}; train it first (python -m harness train "
            f"--config {spec}, one process) or give its checkpoint, then start the torchrun group"
        )


def run_experiment(
    cfg: ExperimentConfig,
    tracker: Tracker,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    stop_states: dict[type, str] | None = None,
    progress=None,
    role: str = "model",
) -> Outcome:
    """Train and evaluate ``cfg`` as one MLflow run.

    ``stop_states`` maps exception types raised by ``on_epoch`` to the state they record (the study maps
    Optuna's TrialPruned to "pruned"); the exception is re-raised after the run is closed.
    """
    prepared = prepare(cfg, tracker)
    ctx = distributed.current()
    start = tracker.start_run if ctx.main else distributed.SilentRun().start_run  # rank 0 alone logs
    run = start(
        experiment,
        run_name or cfg.name,
        parent_id=parent_id,
        tags={
            "config_hash": cfg.hash(),
            "role": role,
            "state": "running",
            "kd.method": cfg.kd.method,
            **process_tags(),
            **(tags or {}),
        },
    )
    if ctx.active and ctx.main:
        distributed.leave("run", {"run_id": run.id})  # for the worker that launched this group
    # a teacher run is looked up by later processes: its heartbeat tells them whether it is still alive
    with Heartbeat(run) if role == "teacher" else contextlib.nullcontext():
        try:
            return train_and_log(run, cfg, prepared, on_epoch, progress)
        except BaseException as exc:
            state = next((s for t, s in (stop_states or {}).items() if isinstance(exc, t)), None)
            if state is None:
                state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            if state in ("failed", "interrupted"):
                if ctx.active and distributed.group_dir() is not None:
                    raise  # the launching worker records the end, with the traceback of the rank that caused it
                run.log_text(traceback.format_exc(), "traceback.txt")
                run.set_tags({"failure": f"{type(exc).__name__}: {str(exc)[:400]}"})
            run.end(state)
            raise


def log_setup(run: Run, cfg: ExperimentConfig, p: Prepared) -> dict[str, float]:
    """What is known before training: config, provenance, teacher cache cost, KD preparation, sizes, the
    trivial predictor's score. Returns the sizes, which are logged again with the final metrics."""
    run.log_params({**cfg.flat(), "seed": cfg.train.seed})
    run.log_yaml(cfg.model_dump(mode="json"), "config.yaml")
    run.set_tags(
        {
            **provenance_tags(p.device),
            **distributed.tags(distributed.current()),
            **p.data.tags,
            **p.teacher_tags,
            "teacher.outputs": p.served or "none",
        }
    )
    cache_flops = teacher_cache_flops(p.served, p.teacher, p.data, p.device)
    if cache_flops is None and hasattr(
        p.server, "metrics"
    ):  # replayed views: their one-off pass, top-k error
        run.log_metrics(p.server.metrics)
    if cache_flops is not None:  # logged now: a run pruned, failed or killed later still counts it
        run.log_metrics({"teacher_cache_flops": cache_flops})
    prep = (
        p.distiller.prepare(_teacher_batches(p.server, p.data, cfg, p.device), p.device) if p.server else {}
    )
    sizes = {"params": count_parameters(p.model), "kd_params": p.distiller.extra_parameters()}
    run.log_metrics({**sizes, **prep, **cached_trivial_score(cfg, p.data, p.device)})
    return sizes


def train_and_log(run: Run, cfg: ExperimentConfig, p: Prepared, on_epoch, progress) -> Outcome:
    sizes = log_setup(run, cfg, p)
    cost = measure_step_cost(
        p.model, p.distiller, p.server, p.teacher, p.data, cfg.train.batch_size, p.device
    )

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.log_metrics(metrics, step=epoch)
        if on_epoch:
            on_epoch(epoch, metrics)

    result = fit(
        p.model,
        p.data,
        cfg,
        device=p.device,
        distiller=p.distiller,
        teacher=p.server,
        on_epoch=log_epoch,
        progress=progress,
        cost=cost,
    )
    sizes.update(result.compute)
    if result.state == "diverged":
        run.log_metrics(
            {k: v for k, v in result.history[-1].items() if k != "epoch"}, step=result.diverged_at
        )
        run.log_metrics(sizes)
        run.set_tags({"failure": f"diverged: training loss not finite at epoch {result.diverged_at}"})
        run.end("diverged")
        return Outcome(run.id, "diverged", {}, result.step_seconds + p.cache_seconds)
    final, test_seconds = finalize(run, p.model, p.data, cfg, result, p.device, p.autocast, sizes)
    run.end("finished")
    return Outcome(run.id, "finished", final, result.step_seconds + p.cache_seconds + test_seconds)


def _teacher_batches(server, data: DataSplits, cfg: ExperimentConfig, device):
    from harness.data.loader import iterate_batches
    from harness.distill.base import KDBatch

    def batches():
        for x, y, idx in iterate_batches(data.train, cfg.train.batch_size, device=device, shuffle=False):
            logits, feats = server(x, idx)
            yield KDBatch(torch.empty(0), y, logits, {}, feats, data.ignore_index)

    return batches


def finalize(
    run: Run, model, data: DataSplits, cfg: ExperimentConfig, result: FitResult, device, autocast, sizes: dict
):
    """Test metrics of the best-validation epoch, cost measures, checkpoint and prediction grid.

    Returns the final metrics and the seconds spent evaluating the test split."""
    kwargs = dict(
        task=data.task,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        device=device,
        autocast=autocast,
    )
    test_start = time.perf_counter()
    test = evaluate(model, data.test, batch_size=eval_batch_size(cfg.train), shard=True, **kwargs)
    test_seconds = time.perf_counter() - test_start
    if not distributed.current().main:  # what follows is logged by rank 0 alone
        return {f"test/{k}": v for k, v in test.items()}, test_seconds
    example = first_batch(data.val, 1, device)[0]
    final = {
        **sizes,
        **{f"val/{k}": v for k, v in result.best_val.items()},
        **{f"test/{k}": v for k, v in test.items()},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_images_per_s": result.train_images_per_s,
        "train_ms_per_image": 1000.0 / result.train_images_per_s if result.train_images_per_s else 0.0,
        "flops": count_flops(model, example),
        "ms_per_image": ms_per_image(model, example, autocast=autocast),
        **train_losses(result),
    }
    run.log_metrics(final, step=len(result.history))  # one step past the last epoch: the selected model
    run.set_tags({"timing": timing_tag(model, example, autocast=autocast)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_NAME
        digest = save_checkpoint(checkpoint_payload(model, cfg, data), path)  # atomic
        run.log_file(path)
        run.set_tags({CHECKPOINT_TAG: digest})  # after the upload: a reader verifies the whole file came
    if data.task == "segmentation":
        images, targets, _ = first_batch(data.val, 4, device)
        with torch.no_grad(), autocast():
            preds = model.eval()(images).argmax(1)
        import matplotlib.pyplot as plt

        fig = prediction_grid(images, targets, preds, data.num_classes, data.ignore_index)
        run.log_figure(fig, "predictions.png")
        plt.close(fig)
    return final, test_seconds


def train_losses(result: FitResult) -> dict[str, float]:
    if not result.history:  # train.epochs 0: the given weights, nothing trained
        return {}
    return {
        "train/loss_final": result.history[-1]["train/loss"],
        "train/loss_best_epoch": result.history[result.best_epoch]["train/loss"],
    }
