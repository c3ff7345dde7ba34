"""Fit one model, with or without a teacher: the epoch loop, loss mixing, NaN guard, best-epoch selection.

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

from harness.data.base import DataSplits, TensorSplit
from harness.data.loader import iterate_batches
from harness.distill.base import Distiller, KDBatch
from harness.evaluate import evaluate
from harness.models.taps import FeatureTap


@dataclass
class FitResult:
    state: str  # "finished" or "diverged"
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)
    train_images_per_s: float = 0.0
    step_seconds: float = 0.0  # wall time inside training and evaluation steps
    diverged_at: int | None = None


def objective_key(task: str) -> str:
    return "miou" if task == "segmentation" else "accuracy"


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


def build_scheduler(optimizer, cfg):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=2)
    return None


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
) -> FitResult:
    """Train ``model`` per ``cfg`` (an ExperimentConfig). ``teacher`` serves (logits, features) per batch.

    ``on_epoch(epoch, metrics)`` is called after each epoch's validation; it may raise to stop training
    (the study driver prunes this way). ``progress(epoch, metrics)`` updates a display.
    """
    tc, kd = cfg.train, cfg.kd
    autocast = autocast_factory(device, tc.amp)
    weights = class_weights(tc.class_weights, data, device)
    params = list(model.parameters()) + [p for p in distiller.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, tc)
    generator = torch.Generator().manual_seed(tc.seed)
    key = objective_key(data.task)
    result = FitResult(state="finished")
    best_value, best_state, stale = -math.inf, None, 0
    images_seen, train_seconds = 0, 0.0
    drop_last = len(data.train) > tc.batch_size  # a last batch of one breaks batch norm in training mode

    tap = FeatureTap(model, distiller.student_layers)
    with tap:
        for epoch in range(tc.epochs):
            alpha, beta = kd.weights(epoch)
            use_teacher = beta > 0 and distiller.needs_teacher
            model.train()
            distiller.train()
            sums: dict[str, torch.Tensor] = {}
            n_batches = 0
            start = time.perf_counter()
            for x, y, idx in iterate_batches(
                data.train,
                tc.batch_size,
                device=device,
                shuffle=True,
                generator=generator,
                drop_last=drop_last,
            ):
                with autocast():
                    logits = model(x)
                ce = F.cross_entropy(logits.float(), y, weight=weights, ignore_index=data.ignore_index)
                terms: dict[str, torch.Tensor] = {}
                if use_teacher:
                    t_logits, t_feats = teacher(x, idx)
                    batch = KDBatch(logits, y, t_logits, tap.features, t_feats, data.ignore_index)
                    terms = distiller(batch)
                loss = alpha * ce + beta * sum(terms.values()) if terms else alpha * ce
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in {"loss": loss, "ce": ce, **terms}.items():
                    sums[name] = sums.get(name, 0) + value.detach().float()
                n_batches += 1
                images_seen += len(x)
            train_metrics = {
                f"train/{k}": v for k, v in zip(sums, (torch.stack(list(sums.values())) / n_batches).tolist())
            }
            train_seconds += time.perf_counter() - start
            if not all(math.isfinite(v) for v in train_metrics.values()):
                result.state, result.diverged_at = "diverged", epoch
                result.history.append({**train_metrics, "epoch": epoch})
                break
            eval_start = time.perf_counter()
            val = evaluate(
                model,
                data.val,
                task=data.task,
                num_classes=data.num_classes,
                ignore_index=data.ignore_index,
                device=device,
                batch_size=max(tc.batch_size, 64),
                autocast=autocast,
            )
            result.step_seconds += time.perf_counter() - eval_start
            metrics = {**train_metrics, **{f"val/{k}": v for k, v in val.items() if not k.startswith("iou_")}}
            if distiller.needs_teacher:
                metrics.update({"train/alpha": alpha, "train/beta": beta})
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            result.history.append({**metrics, "epoch": epoch})
            if val[key] > best_value:
                best_value, stale = val[key], 0
                result.best_epoch, result.best_val = epoch, val
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if progress:
                progress(epoch, metrics)
            if on_epoch:
                on_epoch(epoch, metrics)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val[key])
            elif scheduler is not None:
                scheduler.step()
            if tc.early_stopping and stale >= tc.early_stopping:
                break

    result.step_seconds += train_seconds
    result.train_images_per_s = images_seen / train_seconds if train_seconds else 0.0
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
