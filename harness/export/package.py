"""The package a user deploys: one folder that runs with onnxruntime and numpy alone.

``model.onnx`` (input ``input``: N x C x H x W float32, output ``logits``), ``package.json`` (what the model
expects and what it was: input normalisation, class names, ignore index, opset, dynamic axes, study, trial,
seeds, metrics, verification and timing), ``state_dict.pt`` (the plain PyTorch state dict) with
``config.yaml`` (the run's exact experiment config: ``harness.models.build_model(config.model, ...)``
rebuilds the network), ``example.npy`` / ``example_target.npy`` (one real validation image, before
normalisation, and its labels) and ``README.md`` with a ``predict`` snippet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from harness.data.base import DataSplits, Normalization
from harness.data.normalize import describe_normalization
from harness.data.transforms import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD

ONNX_FILE = "model.onnx"
META_FILE = "package.json"
README_FILE = "README.md"
SIDE_FILES = (
    "package.json",
    "README.md",
    "state_dict.pt",
    "config.yaml",
    "example.npy",
    "example_target.npy",
)


def normalization(config: dict, in_channels: int, train_stats=None) -> dict:
    """Per-channel mean and std applied after the source's scaling to [0, 1] (None: none), in numbers and
    words. ``train_stats`` gives the training split's (mean, std) for ``normalize: true``."""
    data = config.get("data") or {}
    norm, mean, std = data.get("normalize"), None, None
    if isinstance(norm, dict):
        parsed = Normalization(**norm)
        mean, std = parsed.mean, parsed.std
    elif norm is True and train_stats is not None:
        mean, std = train_stats
    elif (data.get("augment") or {}).get("normalize"):
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    return {
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "description": describe_normalization(data, in_channels),
    }


def write_package(
    folder: Path, payload: dict, data: DataSplits, meta: dict, example: torch.Tensor
) -> list[Path]:
    """Everything but ``model.onnx`` (already exported into ``folder``). ``meta`` is package.json's content;
    ``example`` one validation image as the model sees it (normalised). Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload["state_dict"], folder / "state_dict.pt")
    (folder / "config.yaml").write_text(yaml.safe_dump(payload["config"], sort_keys=False), encoding="utf-8")
    raw = example[0].cpu().float().numpy()
    norm = meta["normalization"]
    if norm["mean"] is not None:
        raw = (
            raw * np.array(norm["std"], np.float32)[:, None, None]
            + np.array(norm["mean"], np.float32)[:, None, None]
        )
    np.save(folder / "example.npy", raw.astype(np.float32))
    target = data.val[0][1]
    np.save(folder / "example_target.npy", np.asarray(target.cpu() if torch.is_tensor(target) else target))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / README_FILE).write_text(readme(folder, meta), encoding="utf-8")
    return [folder / ONNX_FILE, *(folder / name for name in SIDE_FILES)]


SNIPPET = '''import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

package = Path({folder!r})  # this folder, or a registry download (other files under extra_files/)
files = package / "extra_files" if (package / "extra_files").is_dir() else package
meta = json.loads((files / "package.json").read_text())
session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])


def predict(image: np.ndarray) -> np.ndarray:
    """One image, C x H x W float32 scaled to [0, 1] as in training -> class ids ({out})."""
    x = np.asarray(image, dtype=np.float32)
    norm = meta["normalization"]
    if norm["mean"] is not None:
        x = (x - np.float32(norm["mean"])[:, None, None]) / np.float32(norm["std"])[:, None, None]
    logits = session.run(None, {{"input": x[None]}})[0]
    return logits.argmax(1)[0]


image = np.load(files / "example.npy")  # a validation image
target = np.load(files / "example_target.npy")
labels = predict(image)
keep = target != meta["ignore_index"]
names = sorted({{meta["class_names"][c] for c in np.unique(labels)}})
print("prediction", labels.shape, "accuracy", float(np.mean(labels[keep] == target[keep])), "classes", names)
'''


def readme(folder: Path, meta: dict) -> str:
    segmentation = meta["task"] == "segmentation"
    out = "H x W, one per pixel" if segmentation else "one id"
    shape = " x ".join(str(d) for d in meta["input"]["shape"])
    norm = meta["normalization"]
    lines = [
        f"# {meta['name']}: exported student",
        "",
        f"From study `{meta['study'] or '-'}`, trial {meta['trial']}, seed {meta['seed']} (run "
        f"`{meta['source_run']}`); {meta['quality']} {meta['quality_text']} over the configuration's seeds "
        f"{meta['seeds']}; {meta['params']} parameters; teacher: {meta['teacher']}.",
        "",
        f"- `model.onnx`: ONNX opset {meta['opset']}, input `input` ({shape}, float32; dynamic: "
        f"{', '.join(meta['input']['dynamic'])}), output `logits` (N x {meta['num_classes']}"
        f"{' x H x W' if segmentation else ''}).",
        f"- Input: {meta['in_channels']} channel(s) scaled to [0, 1] as `{meta['data_source']}` loads them, then "
        f"normalisation: {norm['description']} (numbers in `package.json`).",
        f"- Classes ({meta['num_classes']}): {', '.join(meta['class_names'])}; label {meta['ignore_index']} "
        "marks pixels that are not scored.",
        f"- {meta['verification']}.",
        f"- ms/image on the CPU ({meta['timing']['setup']}): onnxruntime {meta['timing']['onnxruntime']:.3f}, "
        f"PyTorch {meta['timing']['pytorch']:.3f}.",
        "- `state_dict.pt` and `config.yaml`: the PyTorch weights and the run's exact config "
        "(`harness.models.build_model(cfg.model, in_channels, num_classes)` rebuilds the network).",
        "",
        "## Predict (onnxruntime and numpy only)",
        "",
        f"The registered copy: `mlflow.artifacts.download_artifacts('models:/{meta['name']}/<version>', "
        "dst_path=DIR)` puts `model.onnx` in DIR and the other files in DIR/extra_files; set `package` to DIR.",
        "",
        "```python",
        SNIPPET.format(folder=str(folder), out=out).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def snippet_of(readme_text: str) -> str:
    """The predict snippet of a package README (the first python block)."""
    return readme_text.split("```python\n", 1)[1].split("```", 1)[0]
