"""Benchmark 1 and 2: a harness trial against a plain training loop, and the harness's bookkeeping overhead.

Response KD, teacher k=32 -> student k=8, digits_seg 64x64 (1,000 training canvases), the same epochs,
batch and seed. The plain loop is written the way the seed documents do it: a DataLoader over a Dataset,
the teacher's forward pass on every batch, ``loss.item()`` every step, validation mIoU each epoch. The
harness trial is a full ``run_experiment`` (MLflow run, teacher outputs cached once, final test
evaluation, checkpoint, ms/image, prediction PNG). The teacher's weights are untrained: speed does not
depend on them.

    python benchmarks/trial_vs_plain.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchmetrics.classification import MulticlassJaccardIndex  # noqa: E402

from benchmarks.common import device, table, write_section  # noqa: E402
from harness.config import build_experiment  # noqa: E402
from harness.data import load_data  # noqa: E402
from harness.engine.run import run_experiment  # noqa: E402
from harness.engine.teacher import _CACHE as teacher_cache  # noqa: E402
from harness.engine.teacher import checkpoint_payload  # noqa: E402
from harness.models.unet import UNet  # noqa: E402
from harness.tracking import Tracker  # noqa: E402

DATA = {"source": "digits_seg", "image_size": 64, "train": 1000, "val": 200, "test": 200, "seed": 0}


class CanvasDataset(Dataset):
    def __init__(self, images, masks):
        self.images, self.masks = images, masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


def plain_loop(teacher, epochs: int, batch_size: int, temperature: float, dev) -> float:
    """Seconds for ``epochs`` epochs of training + validation, written the usual way."""
    data = load_data(build_experiment({"name": "b", "data": DATA, "model": {"name": "unet"}}, "bench").data)
    torch.manual_seed(0)
    student = UNet(1, 11, width=8).to(dev)
    teacher = teacher.to(dev).eval()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    train = DataLoader(
        CanvasDataset(data.train.images, data.train.targets), batch_size=batch_size, shuffle=True
    )
    val = DataLoader(CanvasDataset(data.val.images, data.val.targets), batch_size=batch_size)
    miou = MulticlassJaccardIndex(11, ignore_index=255).to(dev)
    start = time.perf_counter()
    for _ in range(epochs):
        student.train()
        running = 0.0
        for x, y in train:
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            kd = (
                F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="none")
                .sum(1)
                .mean()
            )
            loss = F.cross_entropy(s, y, ignore_index=255) + kd * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()
        student.eval()
        miou.reset()
        with torch.no_grad():
            for x, y in val:
                miou.update(student(x.to(dev)).argmax(1), y.to(dev))
        miou.compute().item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def harness_trial(teacher_path: Path, epochs: int, batch_size: int, temperature: float, store: str):
    cfg = build_experiment(
        {
            "name": "bench",
            "data": DATA,
            "model": {"name": "unet", "width": 8},
            "train": {"epochs": epochs, "batch_size": batch_size, "lr": 3e-3, "seed": 0},
            "kd": {"method": "response", "temperature": temperature},
            "teacher": str(teacher_path),
        },
        "bench",
    )
    tracker = Tracker(store)
    tracker.experiment_id("bench")  # create the store before timing: a study does this once
    start = time.perf_counter()
    outcome = run_experiment(cfg, tracker, experiment="bench")
    wall = time.perf_counter() - start
    return wall, outcome.compute_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    dev = device()
    n_images = DATA["train"] * args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        teacher = UNet(1, 11, width=32)
        cfg = build_experiment({"name": "t", "data": DATA, "model": {"name": "unet", "width": 32}}, "bench")
        path = Path(tmp) / "teacher.pt"
        torch.save(checkpoint_payload(teacher, cfg, load_data(cfg.data)), path)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        store = os.environ["MLFLOW_TRACKING_URI"]
        harness_trial(path, 1, args.batch_size, 4.0, store)  # warm-up: imports, data, first-call costs
        teacher_cache.clear()  # the first trial of a study computes the teacher's outputs ...
        first_wall, first_compute = harness_trial(path, args.epochs, args.batch_size, 4.0, store)
        later_wall, later_compute = harness_trial(
            path, args.epochs, args.batch_size, 4.0, store
        )  # ... later ones reuse them
        p_wall = plain_loop(teacher, args.epochs, args.batch_size, 4.0, dev)
    rows = [
        {
            "loop": "plain (DataLoader, live teacher, .item() per step)",
            "wall s": f"{p_wall:.1f}",
            "images/s": f"{n_images / p_wall:.0f}",
            "speed-up": "1.00x",
        },
        {
            "loop": "harness, first trial of a study (computes the teacher cache)",
            "wall s": f"{first_wall:.1f}",
            "images/s": f"{n_images / first_wall:.0f}",
            "speed-up": f"{p_wall / first_wall:.2f}x",
        },
        {
            "loop": "harness, every later trial (reuses the cache)",
            "wall s": f"{later_wall:.1f}",
            "images/s": f"{n_images / later_wall:.0f}",
            "speed-up": f"{p_wall / later_wall:.2f}x",
        },
    ]
    h_wall, h_steps = first_wall, first_compute
    overhead = (h_wall - h_steps) / h_wall
    body = (
        f"Response KD, teacher k=32 -> student k=8, digits_seg 64x64, {DATA['train']} training images, "
        f"{args.epochs} epochs, batch {args.batch_size}, seed 0. Images/s counts training images "
        "(epochs x 1,000) over the whole wall time of each.\n\n"
        + table(rows, ["loop", "wall s", "images/s", "speed-up"])
        + "\n\n**Speed-up: "
        f"{p_wall / first_wall:.2f}x for a study's first trial, {p_wall / later_wall:.2f}x for the others** "
        "(target >= 3x).\n\n"
        f"**Overhead** of the first trial (wall time outside training and evaluation steps, over wall time): "
        f"{100 * overhead:.1f}% ({h_wall - h_steps:.2f} s of {h_wall:.1f} s; target < 3%). Compute is the "
        "training and validation steps, caching the teacher's outputs and the final test evaluation; the "
        "overhead is the rest: building the model and KD method, MLflow logging, FLOP count, ms/image "
        "timing, checkpoint and prediction PNG (the dataset is built once per process and reused, as in "
        "a study)."
    )
    write_section("1-2. Harness trial against a plain loop; overhead", body)


if __name__ == "__main__":
    main()
