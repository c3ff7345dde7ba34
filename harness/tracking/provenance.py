"""What a run needs to be reproduced: git commit, package versions, device."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

import torch

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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
        **{f"version.{k}": v for k, v in versions().items()},
    }
