"""Model registry. Each model module registers a config and a builder(cfg, in_channels, num_classes).

A built model may carry ``kd_layers``: names of its submodules (as in ``named_modules()``), ordered from
shallow to deep, that feature-based KD methods tap by default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from harness.registry import Registry

MODELS = Registry("model", "name")


class ModelConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
