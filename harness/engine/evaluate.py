"""Measures of a trained model: loss, mIoU, pixel accuracy, accuracy, parameters, FLOPs, ms/image; and the
score of the trivial predictors (the majority class everywhere; for binary one-channel segmentation also the
best single intensity threshold) that a model has to beat."""

from __future__ import annotations

import hashlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from harness.data.base import quality_metric
from harness.data.loader import iterate_batches
from harness.engine import distributed
from harness.engine.threshold import ThresholdPrediction, fit_threshold

# torchmetrics would all-gather its states on compute() whenever a process group exists; a sharded
# evaluation sums them itself (distributed.reduce_metric_states) and an unsharded one must not sync.
LOCAL = {"sync_on_compute": False}


def segmentation_metrics(num_classes: int, ignore_index: int, device) -> dict[str, object]:
    kw = dict(num_classes=num_classes, ignore_index=ignore_index, **LOCAL)
    return {
        "miou": MulticlassJaccardIndex(average="macro", **kw).to(device),
        "pixel_acc": MulticlassAccuracy(average="micro", **kw).to(device),
        "iou": MulticlassJaccardIndex(average=None, **kw).to(device),
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
    shard: bool = False,
) -> dict[str, float]:
    """Loss and task metrics over a whole split. Returns plain floats (one host sync at the end).

    ``shard``: every process of a group (torchrun) evaluates its share of each batch and the sums (loss,
    pixel counts, confusion matrices) are added up over the group, so all get the one-process figures."""
    ctx = distributed.current() if shard else distributed.Dist()
    model.eval()
    if task == "segmentation":
        metrics = segmentation_metrics(num_classes, ignore_index, device)
    else:
        metrics = {"accuracy": MulticlassAccuracy(num_classes, average="micro", **LOCAL).to(device)}
    loss_sum = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for x, y, _ in iterate_batches(split, batch_size, device=device, shuffle=False, shard=ctx.shard):
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
        count += (y != ignore_index).sum()
        pred = logits.argmax(1)
        for metric in metrics.values():
            metric.update(pred, y)
    if ctx.active:
        distributed.all_sum(loss_sum, count)
        for metric in metrics.values():
            distributed.reduce_metric_states(metric)
    out = {"loss": (loss_sum / count.clamp(min=1)).item()}
    for name, metric in metrics.items():
        value = metric.compute()
        if value.dim() == 0:
            out[name] = value.item()
        else:
            out.update(per_class(name, value, metric.confmat))
    return out


def per_class(name: str, values: torch.Tensor, confmat: torch.Tensor) -> dict[str, float]:
    """``<name>_<c>`` for the classes present in the target or the prediction: torchmetrics reads 0 for a
    class absent from both, which is no score at all (the macro mean drops it too)."""
    present = (confmat.sum(0) + confmat.sum(1)) > 0
    return {f"{name}_{i}": v for i, (v, p) in enumerate(zip(values.tolist(), present.tolist())) if p}


class ConstantPrediction(nn.Module):
    """Predicts one class for every image (classification) or pixel (segmentation), whatever the input."""

    def __init__(self, label: int, num_classes: int, per_pixel: bool):
        super().__init__()
        self.label, self.num_classes, self.per_pixel = label, num_classes, per_pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (len(x), self.num_classes, *x.shape[2:]) if self.per_pixel else (len(x), self.num_classes)
        logits = torch.zeros(shape, device=x.device)
        logits[:, self.label] = 1.0
        return logits


def label_counts(split, num_classes: int, ignore_index: int, device: torch.device) -> torch.Tensor:
    """How often each class occurs among a split's labels (pixels or images), ignore_index left out."""
    if hasattr(split, "targets"):
        batches = [split.targets]
    else:
        batches = (y for _, y, _ in iterate_batches(split, 64, device=device, shuffle=False))
    counts = torch.zeros(num_classes, dtype=torch.long)
    for y in batches:
        y = y[y != ignore_index].flatten().cpu()
        counts += torch.bincount(y, minlength=num_classes)[:num_classes]
    return counts


def trivial_score(data, device: torch.device) -> dict[str, float]:
    """``trivial/test_<metric>``: the training split's majority class predicted for every pixel (or image),
    scored on the test split with the model's quality metric. For a two-class one-channel segmentation also
    ``trivial/threshold_test_<metric>``: the best single intensity threshold chosen on train
    (:mod:`harness.engine.threshold`), and ``trivial/threshold``, its value."""
    counts = label_counts(data.train, data.num_classes, data.ignore_index, device)
    per_pixel = data.task == "segmentation"
    predictor = ConstantPrediction(int(counts.argmax()), data.num_classes, per_pixel)
    metric = quality_metric(data.task)
    scores = evaluate(
        predictor,
        data.test,
        task=data.task,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        device=device,
    )
    out = {f"trivial/test_{metric}": scores[metric]}
    if per_pixel and data.num_classes == 2 and data.in_channels == 1:
        threshold, above, _ = fit_threshold(data.train, data.ignore_index, device)
        scores = evaluate(
            ThresholdPrediction(threshold, above),
            data.test,
            task=data.task,
            num_classes=2,
            ignore_index=data.ignore_index,
            device=device,
        )
        out.update({f"trivial/threshold_test_{metric}": scores[metric], "trivial/threshold": threshold})
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


def memory_format(model: nn.Module) -> str:
    """channels_last when the model's 4-d weights are stored so (``model.to(memory_format=...)``)."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return "channels_last"
    return "contiguous"


def describe_timing(model: nn.Module, x: torch.Tensor, ctx, threads: int) -> str:
    """What a latency figure measured, in words: device, CPU threads, input C x H x W and batch, the dtype
    the forward ran in and the memory format (the run's ``timing`` tag; the report groups ms/image by it)."""
    from harness.tracking.provenance import device_name

    autocast_on, autocast_dtype = _autocast_state(ctx, x.device.type)
    dtype = f"{autocast_dtype.removeprefix('torch.')} autocast" if autocast_on else str(x.dtype)
    parts = [device_name(x.device)]
    if x.device.type == "cpu":
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    parts += [
        f"input {'x'.join(map(str, x.shape[1:]))}, batch {x.shape[0]}",
        dtype.removeprefix("torch."),
        memory_format(model),
    ]
    return "; ".join(parts)


def architecture_key(model: nn.Module, x: torch.Tensor, ctx, threads: int) -> tuple:
    """What ms/image depends on: the module tree (its repr holds every layer's hyperparameters), the
    parameters' shapes, dtypes and memory layout, and everything :func:`describe_timing` names (device,
    threads, input shape, dtype and autocast, memory format), plus the input's strides. Not the weights or
    the seed: every trial of a study with the same student gets the same key."""
    tensors = [(n, tuple(t.shape), str(t.dtype), t.stride()) for n, t in model.state_dict().items()]
    text = f"{type(model).__qualname__}|{model!r}|{tensors}"
    digest = hashlib.sha1(text.encode()).hexdigest()
    timing = describe_timing(model, x, ctx, threads)
    return (digest, timing, tuple(x.shape), str(x.dtype), str(x.device), x.stride(), threads)


def timing_tag(
    model: nn.Module, example: torch.Tensor, *, autocast=None, threads: int = LATENCY_THREADS
) -> str:
    """The ``timing`` tag of a run whose ms/image :func:`ms_per_image` measured with these arguments."""
    x = example[:1]
    return describe_timing(model, x, autocast or _no_autocast(x), threads)


def _no_autocast(x: torch.Tensor):
    return lambda: torch.autocast(x.device.type, enabled=False)


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
    ctx = autocast or _no_autocast(x)
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
