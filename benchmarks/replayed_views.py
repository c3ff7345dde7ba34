"""Benchmark 6: KD under random augmentation, ms per training step: no KD, live teacher, replayed views.

The replayed_views study's setting (digits_seg 32x32, 1,000 training canvases, flips + random scale 0.8-1.25 +
32x32 crops on the device; student k=8 depth 2, teacher k=16 depth 5, batch 8, response KD), each arm trained
for the same epochs in one process with the engine's own prepare + fit (no MLflow). ms/step is the training
steps' wall time (FitResult train_seconds / train_steps: forward, KD, backward, optimizer; validation not
included); the replayed arms' one-off teacher pass over the stored views is timed apart. The teacher's weights
are untrained: speed does not depend on them. Target: replayed-view KD at >= 0.9x the no-KD student's speed.

    python benchmarks/replayed_views.py [--epochs 3] [--views 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import table, write_section  # noqa: E402
from harness.config import build_experiment  # noqa: E402
from harness.data import load_data  # noqa: E402
from harness.engine import views as views_module  # noqa: E402
from harness.engine.fit import fit  # noqa: E402
from harness.engine.run import prepare  # noqa: E402
from harness.engine.teacher import checkpoint_payload  # noqa: E402
from harness.models import build_model  # noqa: E402

DATA = {"source": "digits_seg", "image_size": 32, "train": 1000, "val": 200, "test": 200, "seed": 0}
AUGMENT = {"hflip": True, "scale": [0.8, 1.25], "crop": 32}


def config(epochs: int, **extra):
    tree = {
        "name": "bench",
        "data": {**DATA, "augment": AUGMENT},
        "model": {"name": "unet", "width": 8, "depth": 2, "batch_norm": True},
        "train": {"epochs": epochs, "batch_size": 8, "lr": 5e-3, "scheduler": "cosine", "seed": 0},
    }
    for key, value in extra.items():
        if "." in key:
            block, leaf = key.split(".")
            tree.setdefault(block, {})[leaf] = value
        else:
            tree[key] = value
    return build_experiment(tree, "bench")


def arm(epochs: int, teacher: str | None, **train) -> dict:
    extra = {f"train.{k}": v for k, v in train.items()}
    if teacher:
        extra.update({"kd.method": "response", "teacher": teacher})
    cfg = config(epochs, **extra)
    views_module._STORES.clear()  # every replayed arm pays its own view pass
    p = prepare(cfg, tracker=None)
    result = fit(p.model, p.data, cfg, device=p.device, distiller=p.distiller, teacher=p.server)
    steps = result.compute["train_steps"]
    return {
        "ms_step": 1000 * result.compute["train_seconds"] / steps,
        "pass_s": p.cache_seconds,
        "served": p.served or "none",
    }


def study_table(name: str, out: Path, margin: float = 0.01) -> str:
    """The replayed_views study's arms side by side with seed-paired verdicts (report/stats.py: paired t,
    Holm across the rows of each table, TOST equivalence within ``margin``): each replayed arm against the
    live teacher, and every KD arm against none. Written to ``out`` and returned."""
    import numpy as np

    from harness.report.load import load_study
    from harness.report.stats import compare_table, paired_differences, tost_p
    from harness.tracking import Tracker

    seeds = load_study(Tracker(), name).seeds
    seeds = seeds[seeds["state"] == "finished"]
    views = seeds.get("params.train.teacher_views", np.nan).fillna(0).astype(int)
    label = np.where(seeds["params.kd.method"] == "none", "none", "live")
    label = np.where(views > 0, "V=" + views.astype(str), label)
    arms = {a: seeds[label == a] for a in dict.fromkeys(["none", "live", "V=1", "V=4", "V=16", *label])}
    arms = {a: f for a, f in arms.items() if len(f)}
    score = {a: dict(zip(f["seed"].astype(int), f["metrics.test/miou"])) for a, f in arms.items()}

    def cell(values) -> str:
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (n={len(values)})"

    lines = [
        "| arm | test mIoU (mean ± std, n) | training ms/image | one-off teacher pass GFLOP |",
        "|---|---:|---:|---:|",
    ]
    for a, f in arms.items():
        flops = f["metrics.teacher_cache_flops"].max() if "metrics.teacher_cache_flops" in f else np.nan
        lines.append(
            f"| {a} | {cell(f['metrics.test/miou'])} | {f['metrics.train_ms_per_image'].mean():.3f} "
            f"| {'' if np.isnan(flops) else f'{flops / 1e9:.0f}'} |"
        )
    for title, pairs in (
        ("replayed views against the live teacher", [(a, "live") for a in arms if a.startswith("V=")]),
        ("KD against none", [(a, "none") for a in arms if a != "none"]),
    ):
        rows = compare_table([(score[a], score[b]) for a, b in pairs])
        lines += [
            "",
            f"**{title}** (seed-paired test mIoU, Holm across these rows, equivalence ±{margin})",
            "",
        ]
        lines += [
            "| arm | difference [95% CI] | p (Holm) | p equivalent (TOST) | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for (a, b), r in zip(pairs, rows):
            p_eq = float(tost_p(paired_differences(score[a], score[b]), margin))
            verdict = "equivalent" if r.verdict == "undecided" and p_eq < 0.05 else r.verdict
            lines.append(
                f"| {a} − {b} | {r.mean:+.4f} [{r.low:+.4f}, {r.high:+.4f}] | {r.p_holm:.3f} | {p_eq:.3f} | {verdict} |"
            )
    text = "\n".join(lines) + "\n"
    out.write_text(
        f"# Study {name}: arms side by side\n\nWritten by `python benchmarks/replayed_views.py --study {name}`.\n\n"
        + text
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument(
        "--study", help="instead: the study's arms and verdicts -> docs/results/<study>/arms.md"
    )
    args = parser.parse_args()
    if args.study:
        out = Path(__file__).resolve().parents[1] / "docs" / "results" / args.study / "arms.md"
        print(study_table(args.study, out))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HARNESS_VIEWS_DIR"] = str(Path(tmp) / "views")
        teacher_cfg = build_experiment(
            {"name": "t", "data": DATA, "model": {"name": "unet", "width": 16, "depth": 5}}, "t"
        )
        data = load_data(teacher_cfg.data)
        model = build_model(teacher_cfg.model, data.in_channels, data.num_classes)
        path = str(Path(tmp) / "teacher.pt")
        torch.save(checkpoint_payload(model, teacher_cfg, data), path)
        arms = {
            "no KD": arm(args.epochs, None),
            "KD, live teacher": arm(args.epochs, path),
            f"KD, replayed views V={args.views}": arm(args.epochs, path, teacher_views=args.views),
            f"KD, replayed views V={args.views}, top-2": arm(
                args.epochs, path, teacher_views=args.views, teacher_views_topk=2
            ),
        }
    base = arms["no KD"]["ms_step"]
    rows = [
        {
            "arm": name,
            "teacher outputs": a["served"],
            "ms/step": f"{a['ms_step']:.2f}",
            "speed vs no KD": f"{base / a['ms_step']:.2f}x",
            "one-off view pass s": f"{a['pass_s']:.1f}" if a["served"].startswith("replayed") else "",
        }
        for name, a in arms.items()
    ]
    replay = arms[f"KD, replayed views V={args.views}"]["ms_step"]
    body = (
        f"The replayed_views study's setting: digits_seg 32x32, 1,000 training canvases, flips + random scale "
        f"0.8-1.25 + 32x32 crops on the device; student k=8 depth 2, teacher k=16 depth 5 (untrained weights), "
        f"batch 8, response KD, {args.epochs} epochs per arm, one process. ms/step: training steps only "
        "(validation and the one-off view pass excluded; the pass is in its own column).\n\n"
        + table(rows, ["arm", "teacher outputs", "ms/step", "speed vs no KD", "one-off view pass s"])
        + f"\n\n**Replayed-view KD runs at {base / replay:.2f}x the no-KD student's speed** (target >= 0.9x); "
        f"the live teacher at {base / arms['KD, live teacher']['ms_step']:.2f}x."
    )
    write_section("6. KD under augmentation: replayed teacher views", body)


if __name__ == "__main__":
    main()
