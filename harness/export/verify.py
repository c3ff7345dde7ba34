"""The exported model against the PyTorch one on real validation images: the largest absolute logit
difference and the quality metric (mIoU, or accuracy) of both, computed by the same ``evaluate`` the
trainer uses. The export is refused when the logits differ by more than ``LOGIT_TOLERANCE`` or the metric
by more than ``METRIC_TOLERANCE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.data.base import DataSplits, TensorSplit, quality_metric
from harness.data.loader import iterate_batches
from harness.engine.evaluate import evaluate
from harness.export import ExportError

LOGIT_TOLERANCE = 1e-3  # absolute, fp32 on the CPU (measured differences are 1e-7 to 1e-5)
METRIC_TOLERANCE = 1e-4  # a logit tie flipped by rounding may move one pixel's argmax, nothing more
BATCH = 16


class OnnxModule(nn.Module):
    """An onnxruntime session behind a module's call, so ``evaluate`` and ``ms_per_image`` run it as they
    run the PyTorch model (CPU tensors in, CPU tensors out)."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def session(path: Path, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Verification:
    images: int
    max_abs_diff: float
    metric: str  # miou or accuracy
    torch_value: float
    onnx_value: float

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_diff <= LOGIT_TOLERANCE
            and abs(self.torch_value - self.onnx_value) <= METRIC_TOLERANCE
        )

    def line(self) -> str:
        return (
            f"verified on {self.images} validation images: max |logit difference| {self.max_abs_diff:.2e} "
            f"(tolerance {LOGIT_TOLERANCE:g}); val {self.metric} PyTorch {self.torch_value:.6f}, "
            f"onnxruntime {self.onnx_value:.6f} (tolerance {METRIC_TOLERANCE:g})"
        )


@torch.no_grad()
def verify(model: nn.Module, onnx_path: Path, data: DataSplits, limit: int | None = None) -> Verification:
    """Compare on the validation split (its first ``limit`` images when given); ExportError when they
    differ beyond the tolerances."""
    model = model.eval().cpu()
    onnx = OnnxModule(session(onnx_path))
    split = data.val
    if limit is not None and limit < len(split):
        split = (
            TensorSplit(split.images[:limit], split.targets[:limit])
            if isinstance(split, TensorSplit)
            else torch.utils.data.Subset(split, range(limit))
        )
    worst = 0.0
    for x, _, _ in iterate_batches(split, BATCH, device=torch.device("cpu"), shuffle=False):
        worst = max(worst, float((model(x).float() - onnx(x)).abs().max()))
    metric = quality_metric(data.task)
    kwargs = dict(
        task=data.task,
        num_classes=data.num_classes,
        ignore_index=data.ignore_index,
        device=torch.device("cpu"),
        batch_size=BATCH,
    )
    result = Verification(
        len(split),
        worst,
        metric,
        evaluate(model, split, **kwargs)[metric],
        evaluate(onnx, split, **kwargs)[metric],
    )
    if not result.ok:
        raise ExportError(f"the ONNX model differs from PyTorch's: {result.line()}; nothing registered")
    return result
