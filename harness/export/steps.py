"""The export's two halves: ``build`` (nothing written to the store: choose the run, rebuild its model from
``model.pt``, export, verify on validation images, time, write the package) and ``publish`` (an export run
under the study's parent run, the registered model version with its tags, links on the parent run)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from harness.export import ExportError
from harness.export.onnx_export import Exported, to_onnx
from harness.export.package import ONNX_FILE, SIDE_FILES, normalization, write_package
from harness.export.select import Choice, choose
from harness.export.timing import cpu_timing
from harness.export.verify import Verification, verify
from harness.tracking import Tracker
from harness.tracking.registry import Registered, experiment_of, register_onnx

CPU = torch.device("cpu")


@dataclass
class Built:
    choice: Choice
    folder: Path
    exported: Exported
    check: Verification
    timing: dict
    meta: dict
    files: list[Path]
    example: np.ndarray  # the model's input for one validation image (normalised), 1 x C x H x W

    def lines(self) -> list[str]:
        c, t = self.choice, self.timing
        return [
            f"chose {c.name}{'' if c.trial is None else f' trial {c.trial}'} seed {c.seed} (run {c.run_id}): "
            f"{c.objective or 'the named run'}; "
            f"{c.quality} {self.meta['quality_text']}",
            f"exported ONNX opset {self.exported.opset}, input {self.exported.input_shape} "
            f"(dynamic: {', '.join(self.exported.dynamic)})",
            self.check.line(),
            f"ms/image ({t['setup']}): onnxruntime {t['onnxruntime']:.3f}, PyTorch {t['pytorch']:.3f}",
        ]


def _checkpoint(tracker: Tracker, run_id: str):
    from harness.engine.teacher import CHECKPOINT_NAME, CHECKPOINT_TAG, load_checkpoint

    expected = (tracker.run_record(run_id) or {}).get(f"tags.{CHECKPOINT_TAG}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracker.download(run_id, CHECKPOINT_NAME, tmp)
        except Exception:
            raise ExportError(
                f"run {run_id} has no {CHECKPOINT_NAME} artifact (it did not finish training); export another run"
            ) from None
        return load_checkpoint(path, CPU, expected)  # a model.pt that does not match its digest: one line


def _train_statistics(cfg):
    """The training split's per-channel mean and std, for ``data.normalize: true`` (else None)."""
    if getattr(cfg.data, "normalize", None) is not True:
        return None
    from harness.data import load_data

    images = load_data(cfg.data.model_copy(update={"normalize": False})).train.images
    return images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).clamp_min(1e-6).tolist()


def build(tracker: Tracker, args) -> Built:
    from harness.config import build_experiment
    from harness.data import load_data
    from harness.engine.compute import first_batch

    choice = choose(tracker, args.study, args.run, args.trial, args.seed)
    model, payload = _checkpoint(tracker, choice.run_id)
    cfg = build_experiment(payload["config"], f"run {choice.run_id}")
    data = load_data(cfg.data)
    example = first_batch(data.val, 1, CPU)[0].float()
    folder = Path(args.out or f"exports/{choice.name}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (ONNX_FILE, *SIDE_FILES):  # an earlier export's files never mix with this one's
        (folder / name).unlink(missing_ok=True)
    try:
        exported = to_onnx(model, example, folder / ONNX_FILE)
        check = verify(model, exported.path, data, limit=args.val_images)
    except ExportError:
        (folder / ONNX_FILE).unlink(missing_ok=True)  # no half-written package is left behind
        raise
    timing = cpu_timing(model, exported.path, example, threads=args.threads)
    tags = choice.tags()
    meta = {
        "name": choice.name,
        "study": choice.name if choice.parent_id else None,
        "trial": choice.trial,
        "trials": choice.trials,
        "seed": choice.seed,
        "seeds": choice.seeds,
        "source_run": choice.run_id,
        "quality": choice.quality,
        "quality_text": tags[choice.quality],
        "quality_mean": choice.mean,
        "quality_std": None if np.isnan(choice.std) else choice.std,
        "params": int(choice.params) if np.isfinite(choice.params) else None,
        "teacher": choice.teacher,
        "settings": choice.settings,
        "task": data.task,
        "data_source": cfg.data.source,
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
        "class_names": data.class_names or [str(i) for i in range(data.num_classes)],
        "ignore_index": data.ignore_index,
        "normalization": normalization(payload["config"], data.in_channels, _train_statistics(cfg)),
        "opset": exported.opset,
        "input": {
            "name": "input",
            "shape": exported.input_shape,
            "dtype": "float32",
            "dynamic": exported.dynamic,
        },
        "output": {"name": "logits", "shape": exported.output_shape, "dtype": "float32"},
        "verification": check.line(),
        "verify": asdict(check),
        "timing": timing,
        "training_ms_per_image": {"pytorch": choice.ms_per_image, "timing": choice.timing},
        "exporter": _versions(),
        "model": payload["config"]["model"],
    }
    files = write_package(folder, payload, data, meta, example)
    return Built(choice, folder, exported, check, timing, meta, files, example.numpy())


def _versions() -> str:
    import onnx
    import onnxruntime

    return (
        f"torch.onnx.export(dynamo=True) with torch {torch.__version__}, onnx {onnx.__version__}; "
        f"verified with onnxruntime {onnxruntime.__version__}"
    )


def version_tags(built: Built) -> dict[str, str]:
    """The model version's tags: the choice's (study, trial, seeds, quality, params, teacher) and the
    export's (opset, verification, ms/image)."""
    t, check = built.timing, built.check
    return {
        **built.choice.tags(),
        "opset": str(built.exported.opset),
        "dynamic": ", ".join(built.exported.dynamic),
        "verify.max_abs_diff": f"{check.max_abs_diff:.3g}",
        f"verify.val_{check.metric}": f"PyTorch {check.torch_value:.6f}, onnxruntime {check.onnx_value:.6f}",
        "ms_per_image.onnxruntime": f"{t['onnxruntime']:.4f}",
        "ms_per_image.pytorch": f"{t['pytorch']:.4f}",
        "timing": t["setup"],
    }


def publish(tracker: Tracker, built: Built) -> Registered:
    """An export run (child of the study's parent run) holding the registered version; links on the parent."""
    c = built.choice
    experiment = experiment_of(tracker, c.run_id)
    tags = version_tags(built)
    run = tracker.start_run(
        experiment,
        f"export-{c.name}",
        parent_id=c.parent_id,
        tags={"role": "export", "state": "running", "source_run": c.run_id},
    )
    try:
        run.log_params({"trial": c.trial, "seed": c.seed, "opset": built.exported.opset})
        run.log_metrics(
            {
                "onnx/ms_per_image": built.timing["onnxruntime"],
                "pytorch/ms_per_image": built.timing["pytorch"],
                "verify/max_abs_diff": built.check.max_abs_diff,
            }
        )
        registered = register_onnx(
            tracker,
            run,
            name=c.name,
            onnx_path=built.folder / ONNX_FILE,
            input_shape=built.exported.input_shape,
            output_shape=built.exported.output_shape,
            example=built.example,
            extra_files=[built.folder / n for n in SIDE_FILES],
            tags=tags,
            description=f"{c.name}: {c.quality} {tags[c.quality]}; {built.check.line()}",
        )
        run.set_tags({"model": registered.uri, "model_version": registered.version})
        run.end("finished")
    except BaseException:
        run.end("failed")
        raise
    link = {
        "export.model": registered.uri,
        "export.run": run.id,
        "export.source_run": c.run_id,
        "export.trial": "" if c.trial is None else c.trial,
        "export.seed": "" if c.seed is None else c.seed,
        "export.ms_per_image.onnxruntime": tags["ms_per_image.onnxruntime"],
        "export.ms_per_image.pytorch": tags["ms_per_image.pytorch"],
        "export.timing": tags["timing"],
    }
    tracker.run(c.parent_id or c.run_id).set_tags(link)
    return registered
