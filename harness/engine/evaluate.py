"""Measures of a trained model: loss, mIoU, pixel accuracy, accuracy, parameters, FLOPs, ms/image."""

from __future__ import annotations

import hashlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from harness.data.loader import iterate_batches


def segmentation_metrics(num_classes: int, ignore_index: int, device) -> dict[str, object]:
    return {
        "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index).to(device),
        "pixel_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index).to(device),
        "iou": MulticlassJaccardIndex(num_classes, average=None, ignore_index=ignore_index).to(device),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split,
    *,
    task: str,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    batch_size: int = 64,
    autocast=None,
) -> dict[str, float]:
    """Loss and task metrics over a whole split. Returns plain floats (one host sync at the end)."""
    model.eval()
    if task == "segmentation":
        metrics = segmentation_metrics(num_classes, ignore_index, device)
    else:
        metrics = {"accuracy": MulticlassAccuracy(num_classes, average="micro").to(device)}
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for x, y, _ in iterate_batches(split, batch_size, device=device, shuffle=False):
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
        count += (y != ignore_index).sum()
        pred = logits.argmax(1)
        for metric in metrics.values():
            metric.update(pred, y)
    out = {"loss": (loss_sum / count.clamp(min=1)).item()}
    for name, metric in metrics.items():
        value = metric.compute()
        if value.dim() == 0:
            out[name] = value.item()
        else:
            out.update({f"{name}_{i}": v for i, v in enumerate(value.tolist())})
    return out


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs for one input (batch 1), counted by torch's FlopCounterMode (a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LATENCY_THREADS = 1  # CPU intra-op threads while timing: a figure that does not depend on the machine's load
_LATENCY: dict[tuple, float] = {}  # architecture key -> ms/image, for this process


def _autocast_state(ctx, device_type: str) -> tuple:
    with ctx():
        return torch.is_autocast_enabled(device_type), str(torch.get_autocast_dtype(device_type))


def architecture_key(model: nn.Module, x: torch.Tensor, ctx, threads: int) -> tuple:
    """What ms/image depends on: the module tree (its repr holds every layer's hyperparameters), the
    parameters' shapes, dtypes and memory layout, the input's shape, dtype and device, autocast and threads.
    Not the weights or the seed: every trial of a study with the same student gets the same key."""
    tensors = [(n, tuple(t.shape), str(t.dtype), t.stride()) for n, t in model.state_dict().items()]
    text = f"{type(model).__qualname__}|{model!r}|{tensors}"
    digest = hashlib.sha1(text.encode()).hexdigest()
    return (digest, tuple(x.shape), str(x.dtype), str(x.device), _autocast_state(ctx, x.device.type), threads)


def clear_latency_cache() -> None:
    _LATENCY.clear()


@torch.no_grad()
def ms_per_image(
    model: nn.Module,
    example: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    autocast=None,
    threads: int = LATENCY_THREADS,
    cache: bool = True,
) -> float:
    """Inference latency at batch 1 in milliseconds: warm-up, synchronised timing, median of repeats, with
    ``threads`` CPU threads (restored after). Measured once per architecture (:func:`architecture_key`)
    in this process and reused, so every trial with the same student reports the same figure."""
    model.eval()
    x = example[:1]
    ctx = autocast or (lambda: torch.autocast(x.device.type, enabled=False))
    key = (*architecture_key(model, x, ctx, threads), warmup, repeats)
    if cache and key in _LATENCY:
        return _LATENCY[key]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _time(model, x, ctx, warmup, repeats)
    finally:
        torch.set_num_threads(previous)
    _LATENCY[key] = result
    return result


def _time(model: nn.Module, x: torch.Tensor, ctx, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        with ctx():
            model(x)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with ctx():
            model(x)
        _sync(x.device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
