"""Models, one module each; ``build_model(cfg, in_channels, num_classes)`` builds what a config asks for."""

from harness.models.base import MODELS, count_parameters
from harness.registry import import_submodules

import_submodules(__name__)


def build_model(cfg, in_channels: int, num_classes: int, *, load_weights: bool = True):
    """The model ``cfg`` names, with ``cfg.weights`` loaded unless ``load_weights`` is false (a checkpoint
    that restores its own state dict right after)."""
    model = MODELS.build(cfg, in_channels, num_classes)
    if load_weights and getattr(cfg, "weights", None):
        from harness.models.weights import load_weights as load

        load(model, cfg.weights)
    return model


__all__ = ["MODELS", "build_model", "count_parameters"]
