"""Read intermediate features by module name with forward hooks; the model's code is never edited."""

from __future__ import annotations

import torch
from torch import nn


class FeatureTap:
    """Context manager: while active, ``features[name]`` holds the latest output of each named submodule."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            sample = ", ".join(list(getattr(model, "kd_layers", []))[:8]) or ", ".join(list(modules)[1:9])
            raise ValueError(
                f"{type(model).__name__} has no layer named {missing}; choose from e.g. {sample}"
            )
        self.modules = {n: modules[n] for n in names}
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTap:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def store(_module, _inputs, output):
            self.features[name] = output

        return store

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, torch.Size]:
    """Shapes of the named features for an example batch (model left in its current train/eval mode)."""
    if not names:
        return {}
    was_training = model.training
    model.eval()
    with FeatureTap(model, names) as tap:
        model(example)
    model.train(was_training)
    return {n: f.shape for n, f in tap.features.items()}
