"""Model registry. Each model module registers a config and a builder(cfg, in_channels, num_classes).

A built model may carry ``kd_layers``: names of its submodules (as in ``named_modules()``), ordered from
shallow to deep, that feature-based KD methods tap by default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_serializer
from torch import nn

from harness.registry import Registry

MODELS = Registry("model", "name")


class ModelConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: str | None = Field(
        None,
        description="state dict to load (.pt/.pth/.safetensors path) or a torchvision weights name (DEFAULT)",
    )

    @model_serializer(mode="wrap")
    def _drop_unset_weights(self, handler):
        # Unset weights are left out of dumps, so configs (and their hashes) read as before the field existed.
        data = handler(self)
        if isinstance(data, dict) and data.get("weights") is None:
            data.pop("weights", None)
        return data


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
