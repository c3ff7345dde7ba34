"""ms/image of the exported model with onnxruntime on the CPU, beside PyTorch's on the same CPU, input and
threads: batch 1, ``WARMUP`` calls, then the median of ``REPEATS`` (``engine.evaluate.ms_per_image``, the
function the trainer's figure comes from, runs both)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.engine.evaluate import ms_per_image, timing_tag
from harness.export.verify import OnnxModule, session

WARMUP = 10
REPEATS = 50


def cpu_timing(
    model: nn.Module, onnx_path: Path, example: torch.Tensor, threads: int = 1
) -> dict[str, object]:
    """``onnxruntime`` and ``pytorch`` ms/image and the ``setup`` both were timed in, in words."""
    x = example[:1].cpu().float()
    model = model.eval().cpu().float()
    onnx = OnnxModule(session(onnx_path, threads))
    kwargs = dict(warmup=WARMUP, repeats=REPEATS, threads=threads, cache=False)
    return {
        "onnxruntime": ms_per_image(onnx, x, **kwargs),
        "pytorch": ms_per_image(model, x, **kwargs),
        "threads": threads,
        "setup": f"{timing_tag(model, x, threads=threads)}; warm-up {WARMUP}, median of {REPEATS}",
    }
