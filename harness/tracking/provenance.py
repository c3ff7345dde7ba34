"""What a run needs to be reproduced: git commit, package versions, device and training threads."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata

import torch

HOST = socket.gethostname()
PACKAGES = ("torch", "torchvision", "torchmetrics", "mlflow", "optuna", "pydantic", "numpy")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model: what the hardware is, not how many threads ran on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance_tags(device: torch.device) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "device": device_name(device),
        "train_threads": str(torch.get_num_threads()),  # CPU intra-op threads while training
        **{f"version.{k}": v for k, v in versions().items()},
    }


def process_tags() -> dict[str, str]:
    """The host and pid of the process writing a run: with a heartbeat, how a dead run is recognised."""
    return {"host": HOST, "pid": str(os.getpid())}
