"""Models, one module each; ``build_model(cfg, in_channels, num_classes)`` builds what a config asks for."""

from harness.models.base import MODELS, count_parameters
from harness.registry import import_submodules

import_submodules(__name__)


def build_model(cfg, in_channels: int, num_classes: int):
    return MODELS.build(cfg, in_channels, num_classes)


__all__ = ["MODELS", "build_model", "count_parameters"]
