"""Benchmark 5: ms/image as the harness logs it (evaluate.ms_per_image) against torch.utils.benchmark.

python benchmarks/latency.py [--widths 2 8 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.utils.benchmark as tb  # noqa: E402

from benchmarks.common import device, table, write_section  # noqa: E402
from harness.engine.evaluate import LATENCY_THREADS, ms_per_image  # noqa: E402
from harness.models.unet import UNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 8, 32])
    args = parser.parse_args()
    dev = device()
    rows = []
    for k in args.widths:
        model = UNet(1, 11, width=k).to(dev).eval()
        x = torch.randn(1, 1, 64, 64, device=dev)
        ours = ms_per_image(model, x, cache=False)
        with torch.no_grad():
            timer = tb.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=LATENCY_THREADS)
            ref = timer.blocked_autorange(min_run_time=2.0).median * 1000
        rows.append(
            {
                "k": k,
                "harness ms/image": f"{ours:.3f}",
                "torch.utils.benchmark ms": f"{ref:.3f}",
                "difference": f"{100 * (ours - ref) / ref:+.1f}%",
            }
        )
    body = (
        "Batch 1, 64x64 input, eval mode, no autocast. The harness times 30 synchronised calls after 5 "
        f"warm-up calls and takes the median; torch.utils.benchmark (same thread count: {LATENCY_THREADS}) runs "
        "blocked_autorange for 2 s. Target: within 10%.\n\n"
        + table(rows, ["k", "harness ms/image", "torch.utils.benchmark ms", "difference"])
    )
    write_section("5. ms/image against torch.utils.benchmark", body)


if __name__ == "__main__":
    main()
