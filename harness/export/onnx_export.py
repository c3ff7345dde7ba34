"""PyTorch -> ONNX with ``torch.onnx.export(dynamo=True)``: the ``torch.export`` based exporter (the one
PyTorch maintains; it translates through onnxscript and needs no network), at opset ``OPSET``.

The batch is always dynamic. Height and width are dynamic too where the model allows, as multiples of the
size its pooling needs (``min_size`` of a k-UNet, ``stride`` of an smp model); a model whose graph fixes them
(an MLP's flatten) is exported at the example's size instead, and the package says which. An operator ONNX
has no function for stops the export with one line naming it.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.export import ExportError

OPSET = 18  # the exporter's native opset: no version conversion; onnxruntime >= 1.14 runs it
MAX_SIDE = 8192  # the largest height or width the dynamic model is declared for
_OPERATOR = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'(?:, overload='(\w+)')?")
_UNSUPPORTED = re.compile(r"(aten::\w+|aten\.\w+(?:\.\w+)?)")


@dataclass
class Exported:
    path: Path
    opset: int
    dynamic: list[str]  # e.g. ["batch", "height (multiple of 4)", "width (multiple of 4)"]
    input_shape: list  # ONNX input shape: ints and dimension names
    output_shape: list


def divisor(model: nn.Module) -> int:
    """What height and width must be multiples of: the model's own statement of it, else 1."""
    for name in ("min_size", "stride"):
        value = getattr(model, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Exported:
    """Export ``model`` (eval, CPU, fp32) for inputs shaped like ``example`` (N, C, H, W)."""
    model = model.eval().cpu().float()
    example = example[:1].cpu().float()
    step = divisor(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    side = MAX_SIDE // step
    spatial = {i: step * torch.export.Dim(n, min=1, max=side) for i, n in ((2, "h"), (3, "w"))}
    attempts = [{0: batch, **spatial}] if example.dim() == 4 else []
    attempts.append({0: batch})
    first_error = None
    for dims in attempts:
        try:
            _export(model, example, path, dims)
        except Exception as exc:  # the exporter raises many types; each becomes one line below
            if first_error is None:
                first_error = exc
            if _operator(exc) is not None:
                break  # a missing operator: a static size would not help
            continue
        inputs, outputs = _shapes(path)
        multiple = f" (multiple of {step})" if step > 1 else ""
        labels = ["batch", "channels", f"height{multiple}", f"width{multiple}"]
        # what the graph left dynamic (the exporter fixes a size the model's graph depends on)
        dynamic = [labels[i] for i, d in enumerate(inputs) if isinstance(d, str) and i < len(labels)]
        return Exported(path, OPSET, dynamic, inputs, outputs)
    raise ExportError(_message(model, first_error)) from None


def _export(model: nn.Module, example: torch.Tensor, path: Path, dims: dict) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )


def _shapes(path: Path) -> tuple[list, list]:
    """The graph's input and output shapes: ints where fixed, dimension names where dynamic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [v.type.tensor_type.shape.dim for v in (graph.input[0], graph.output[0])]
    return tuple([d.dim_value if d.HasField("dim_value") else d.dim_param for d in ds] for ds in dims)


def _operator(exc: BaseException) -> str | None:
    text = str(exc)
    if m := _OPERATOR.search(text):
        return m.group(1) + (f".{m.group(2)}" if m.group(2) and m.group(2) != "default" else "")
    if "not supported" in text and (m := _UNSUPPORTED.search(text)):
        return m.group(1)
    return None


def _message(model: nn.Module, exc: BaseException | None) -> str:
    what = type(model).__name__
    op = _operator(exc) if exc is not None else None
    if op:
        return (
            f"cannot export {what} to ONNX: operator {op} has no ONNX function at opset {OPSET}; "
            "replace it in the model or export another configuration (--trial)"
        )
    summary = " ".join(str(exc).split())[:300] if exc is not None else "unknown error"
    return f"cannot export {what} to ONNX ({type(exc).__name__}: {summary}); export another configuration"
