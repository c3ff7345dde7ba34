"""Fit one model, with or without a teacher: the epoch loop, loss mixing, NaN guard, best-epoch selection.

Length: ``train.epochs`` passes over the training split, or with ``train.iterations`` exactly that many
optimizer steps (ceil(iterations / steps per epoch) passes, the last one cut short). Per-step learning rates:
``scheduler: poly`` sets lr0 * (1 - n / N) ** power after the n-th of N steps (N: the iterations, the epochs'
steps, or a compute budget's progress); ``cosine`` with a budget follows the budget's progress.

The hot loop does no host-device synchronisation: per-step losses are summed on the device and read once
per epoch, which is also when divergence (NaN/inf) is detected and the trial stopped.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from harness.data.base import DataSplits, TensorSplit, quality_metric
from harness.data.loader import iterate_batches
from harness.distill.base import Distiller, KDBatch
from harness.engine import distributed
from harness.engine.compute import Meter, StepCost, budget_lr, epoch_batches
from harness.engine.evaluate import evaluate
from harness.models.taps import FeatureTap


@dataclass
class FitResult:
    state: str  # "finished" or "diverged"
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)
    train_images_per_s: float = 0.0
    step_seconds: float = 0.0  # wall time inside training and evaluation steps
    compute: dict[str, float] = field(default_factory=dict)  # train_flops, train_seconds, ... (Meter)
    diverged_at: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from harness.errors import HarnessError

        raise HarnessError(f"train.device is '{name}' but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def autocast_factory(device: torch.device, enabled: bool) -> Callable:
    if device.type == "cuda" and enabled:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


def class_weights(spec, data: DataSplits, device) -> torch.Tensor | None:
    if spec == "none":
        return None
    if isinstance(spec, list):
        if len(spec) != data.num_classes:
            from harness.errors import ConfigError

            raise ConfigError(
                f"train.class_weights has {len(spec)} values but the data has {data.num_classes} classes"
            )
        return torch.tensor(spec, dtype=torch.float32, device=device)
    if not isinstance(data.train, TensorSplit):
        from harness.errors import ConfigError

        raise ConfigError(
            "train.class_weights 'inverse_freq' needs an in-memory dataset; give a list of weights instead"
        )
    y = data.train.targets
    y = y[y != data.ignore_index]
    counts = torch.bincount(y.flatten().cpu(), minlength=data.num_classes).float()
    weights = counts.sum() / (data.num_classes * counts.clamp(min=1))
    return weights.to(device)


def build_optimizer(params, cfg):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class Selection:
    """The validation metric that picks the best epoch, stops early and drives the plateau scheduler."""

    key: str  # a key of evaluate()'s result: miou, accuracy, loss, ...
    minimise: bool

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.minimise else value > best


def selection(train_cfg, task: str) -> Selection:
    """``train.select_on`` (or the task's quality metric), checked against what the task's evaluation logs."""
    name = train_cfg.select_on or f"val/{quality_metric(task)}"
    key = name.removeprefix("val/")
    logged = ("loss", "miou", "pixel_acc") if task == "segmentation" else ("loss", "accuracy")
    if key not in logged:
        from harness.errors import ConfigError

        raise ConfigError(
            f"train.select_on is {name!r} but {task} runs log {['val/' + k for k in logged]}; use one of those"
        )
    return Selection(key, key.endswith("loss"))


def build_scheduler(optimizer, cfg, select: Selection, epochs: int):
    if cfg.scheduler == "poly" or (cfg.scheduler == "cosine" and cfg.budget is not None):
        return None  # laid over the budget per step instead (compute.budget_lr)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "plateau":
        mode = "min" if select.minimise else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.gamma, patience=2)
    return None


def planned_epochs(train_cfg, steps_per_epoch: int) -> int:
    """Passes over the training split: ``train.epochs``, or as many as ``train.iterations`` steps take."""
    if train_cfg.iterations is None:
        return train_cfg.epochs
    return math.ceil(train_cfg.iterations / steps_per_epoch)


def step_lr(optimizer: torch.optim.Optimizer, train_cfg, meter: Meter, total_steps: int):
    """A function that sets the learning rate after each step, or None where an epoch scheduler (or none)
    applies. ``poly``: lr0 * (1 - done) ** power, done = steps taken / ``total_steps`` (a budget's progress
    when there is one); ``cosine`` with a budget: compute.budget_lr."""
    if train_cfg.scheduler != "poly":
        cosine = budget_lr(optimizer, train_cfg)
        return None if cosine is None else (lambda: cosine(meter.progress()))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    def poly() -> None:
        done = meter.progress() if train_cfg.budget is not None else meter.steps / total_steps
        factor = (1.0 - min(done, 1.0)) ** train_cfg.power
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    return poly


@dataclass
class Step:
    """What one training epoch needs besides the model: the loss weighting and the teacher's outputs."""

    optimizer: torch.optim.Optimizer
    distiller: Distiller
    teacher: Callable | None
    tap: FeatureTap
    class_weights: torch.Tensor | None
    autocast: Callable
    generator: torch.Generator
    drop_last: bool
    meter: Meter
    max_steps: int  # train.iterations, or every step of the planned epochs
    set_lr: Callable[[], None] | None = None  # a per-step learning rate (poly, cosine over a budget)
    student: nn.Module | None = None  # what a step calls: the model, or DDP over it (engine/distributed.py)
    kd: nn.Module | None = None  # the distiller, or DDP over it when it has trainable modules
    ctx: distributed.Dist = field(default_factory=distributed.Dist)


def kd_on(cfg, distiller: Distiller, epoch: int) -> bool:
    """Whether the KD terms (and so the teacher) run in this epoch."""
    return cfg.kd.weights(epoch)[1] > 0 and distiller.needs_teacher


def train_epoch(model: nn.Module, data: DataSplits, cfg, step: Step, epoch: int, device) -> tuple[dict, int]:
    """One pass over the training split. Returns the mean of each loss term (``train/<term>``, read from the
    device once, averaged over the processes of a group) and the number of images seen (by all of them).

    Each optimizer step takes one global batch: this process's share of it (all of it alone), split into
    ``train.grad_accum`` micro-batches whose losses are weighted by their share of it."""
    alpha, beta = cfg.kd.weights(epoch)
    use_teacher = kd_on(cfg, step.distiller, epoch)
    model.train()
    step.distiller.train()
    sums: dict[str, torch.Tensor] = {}
    n_batches = images = 0
    batches = iterate_batches(
        data.train,
        cfg.train.batch_size,
        device=device,
        shuffle=True,
        generator=step.generator,
        drop_last=step.drop_last,
        shard=step.ctx.shard,
    )
    wrapped = [step.student, step.kd]
    for x, y, idx in batches:
        step.optimizer.zero_grad(set_to_none=True)
        parts = distributed.micro_batches(len(x), cfg.train.grad_accum)
        for i, part in enumerate(parts):
            share = 1.0 if len(parts) == 1 else (part.stop - part.start) / len(x)
            with distributed.no_sync(wrapped, last=i == len(parts) - 1):
                values = step_losses(x[part], y[part], idx[part], data, step, alpha, beta, use_teacher)
                (values["loss"] if share == 1.0 else values["loss"] * share).backward()
            for name, value in values.items():
                value = value.detach().float()
                sums[name] = sums.get(name, 0) + (value if share == 1.0 else value * share)
        step.optimizer.step()
        n_batches += 1
        seen = min(cfg.train.batch_size, len(data.train)) if step.ctx.active else len(x)
        images += seen
        step.meter.add(seen)
        if step.set_lr:
            step.set_lr()
        if step.meter.spent or step.meter.steps >= step.max_steps:
            break
    means = distributed.all_mean(torch.stack(list(sums.values())) / n_batches).tolist()
    return {f"train/{k}": v for k, v in zip(sums, means)}, images


def step_losses(x, y, idx, data: DataSplits, step: Step, alpha: float, beta: float, use_teacher: bool):
    """The weighted loss of one (micro-)batch and its terms: ``loss``, ``ce`` and the KD method's."""
    with step.autocast():
        logits = step.student(x)
    ce = F.cross_entropy(logits.float(), y, weight=step.class_weights, ignore_index=data.ignore_index)
    terms: dict[str, torch.Tensor] = {}
    if use_teacher:
        t_logits, t_feats = step.teacher(x, idx)
        terms = step.kd(KDBatch(logits, y, t_logits, step.tap.features, t_feats, data.ignore_index))
    loss = alpha * ce + beta * sum(terms.values()) if terms else alpha * ce
    return {"loss": loss, "ce": ce, **terms}


def eval_batch_size(train_cfg) -> int:
    """``train.eval_batch_size``, or by default max(batch_size, 64)."""
    return train_cfg.eval_batch_size or max(train_cfg.batch_size, 64)


def validate(model: nn.Module, data: DataSplits, cfg, device, autocast) -> dict[str, float]:
    return evaluate(
        model,
        data.val,
        task=data.task,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        device=device,
        batch_size=eval_batch_size(cfg.train),
        autocast=autocast,
        shard=True,
    )


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg,
    *,
    device: torch.device,
    distiller: Distiller,
    teacher=None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress=None,
    cost: StepCost | None = None,
) -> FitResult:
    """Train ``model`` per ``cfg`` (an ExperimentConfig). ``teacher`` serves (logits, features) per batch.

    ``on_epoch(epoch, metrics)`` is called after each epoch's validation; it may raise to stop training
    (the study driver prunes this way). ``progress(epoch, metrics)`` updates a display. The model ends with
    the weights of its best validation epoch. ``cost`` prices a training step (train_flops, FLOPs budgets).
    With ``train.epochs: 0`` the model is validated once as it is and that is reported as the best, at
    epoch -1 (before any training), with an empty history.
    """
    tc = cfg.train
    autocast = autocast_factory(device, tc.amp)
    if tc.epochs == 0:
        return as_given(model, data, cfg, device, autocast)
    select = selection(tc, data.task)
    params = list(model.parameters()) + [p for p in distiller.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    result = FitResult(state="finished")
    best_value, best_state, stale = None, None, 0
    images_seen = 0
    ctx = distributed.current()
    model = distributed.sync_batch_norm(model, tc, ctx)
    tap = FeatureTap(model, distiller.student_layers)
    drop_last = len(data.train) > tc.batch_size  # a last batch of one breaks batch norm in training mode
    batches = epoch_batches(len(data.train), tc.batch_size, drop_last)
    epochs = planned_epochs(tc, len(batches))
    max_steps = tc.iterations or epochs * len(batches)
    scheduler = build_scheduler(optimizer, tc, select, epochs)
    kd_epochs = [kd_on(cfg, distiller, e) for e in range(epochs)]
    meter = Meter(tc.budget, cost or StepCost(0.0), batches, kd_epochs, device)
    step = Step(
        optimizer,
        distiller,
        teacher,
        tap,
        class_weights(tc.class_weights, data, device),
        autocast,
        torch.Generator().manual_seed(tc.seed),
        drop_last,
        meter,
        max_steps,
        step_lr(optimizer, tc, meter, max_steps),
        distributed.wrap(model, ctx, device),
        distributed.wrap(distiller, ctx, device, kd=True),
        ctx,
    )
    with tap:
        for epoch in range(epochs):
            meter.start_epoch(kd_epochs[epoch])
            train_metrics, images = train_epoch(model, data, cfg, step, epoch, device)
            meter.end_epoch()
            images_seen += images
            if not all(math.isfinite(v) for v in train_metrics.values()):
                result.state, result.diverged_at = "diverged", epoch
                result.history.append({**train_metrics, "epoch": epoch})
                break
            eval_start = time.perf_counter()
            val = validate(model, data, cfg, device, autocast)
            result.step_seconds += time.perf_counter() - eval_start
            metrics = {**train_metrics, **{f"val/{k}": v for k, v in val.items() if not k.startswith("iou_")}}
            if distiller.needs_teacher:
                metrics.update(dict(zip(("train/alpha", "train/beta"), cfg.kd.weights(epoch))))
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            result.history.append({**metrics, "epoch": epoch})
            if select.better(val[select.key], best_value):
                best_value, stale = val[select.key], 0
                result.best_epoch, result.best_val = epoch, val
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            distributed.on_main(ctx, after_epoch, progress, on_epoch, epoch, metrics)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val[select.key])
            elif scheduler is not None:
                scheduler.step()
            if meter.spent or meter.steps >= max_steps or (tc.early_stopping and stale >= tc.early_stopping):
                break

    result.step_seconds += meter.seconds
    result.train_images_per_s = images_seen / meter.seconds if meter.seconds else 0.0
    result.compute = meter.metrics()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def after_epoch(progress, on_epoch, epoch: int, metrics: dict[str, float]) -> None:
    """The display and the caller's callback (logging, pruning): on rank 0 alone, whose decision to stop
    every rank follows (distributed.on_main)."""
    if progress:
        progress(epoch, metrics)
    if on_epoch:
        on_epoch(epoch, metrics)


def as_given(model: nn.Module, data: DataSplits, cfg, device, autocast) -> FitResult:
    """The model's weights as they are (``train.epochs: 0``): validated once, nothing trained."""
    start = time.perf_counter()
    val = validate(model, data, cfg, device, autocast)
    return FitResult(state="finished", best_epoch=-1, best_val=val, step_seconds=time.perf_counter() - start)
