"""Benchmark 3: model FLOP utilisation of k-UNet training steps against the machine's measured matmul peak.

Training FLOPs per step are counted by torch's FlopCounterMode over one forward + backward; achieved
FLOP/s = FLOPs per step / median step time. The peak is the best of repeated 4096x4096 (CPU) or 8192x8192
(GPU) matmuls in the same precision as training (fp32 on CPU, bf16 autocast on CUDA).

    python benchmarks/mfu.py [--widths 8 32 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import device, table, write_section  # noqa: E402
from harness.engine.fit import autocast_factory  # noqa: E402
from harness.models.unet import UNet  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dev, autocast) -> float:
    n = 8192 if dev.type == "cuda" else 4096
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best = float("inf")
    for i in range(10):
        sync(dev)
        start = time.perf_counter()
        with autocast():
            a @ b
        sync(dev)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_step(model, opt, x, y, autocast):
    with autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(width: int, batch: int, dev, autocast, repeats: int) -> dict:
    model = UNet(1, 11, width=width).to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, 64, 64, device=dev)
    y = torch.randint(0, 11, (batch, 64, 64), device=dev)
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, x, y, autocast)
    flops = counter.get_total_flops()
    for _ in range(3):
        train_step(model, opt, x, y, autocast)
    times = []
    for _ in range(repeats):
        sync(dev)
        start = time.perf_counter()
        train_step(model, opt, x, y, autocast)
        sync(dev)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "k": width,
        "GFLOP/image": flops / batch / 1e9,
        "images/s": batch / step,
        "achieved GFLOP/s": flops / step / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dev = device()
    autocast = autocast_factory(dev, True)
    peak = matmul_peak(dev, autocast)
    rows = []
    for k in args.widths:
        r = measure(k, args.batch, dev, autocast, args.repeats if k < 64 or dev.type == "cuda" else 3)
        r["MFU"] = f"{100 * r['achieved GFLOP/s'] * 1e9 / peak:.0f}%"
        rows.append({k2: (f"{v:.2f}" if isinstance(v, float) else v) for k2, v in r.items()})
    precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
    body = (
        f"k-UNet training steps (forward + backward + Adam), 64x64 inputs, batch {args.batch}, {precision}. "
        f"Measured matmul peak: **{peak / 1e9:.0f} GFLOP/s**.\n\n"
        + table(rows, ["k", "GFLOP/image", "images/s", "achieved GFLOP/s", "MFU"])
    )
    write_section("3. Model FLOP utilisation", body)


if __name__ == "__main__":
    main()
