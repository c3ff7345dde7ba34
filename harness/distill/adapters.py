"""Pieces the KD methods share: adapters that map student channels to the teacher's, checked layer pairs,
pooling helpers, and the feature-or-logits choice of the embedding methods (rkd, triplet).

Adapters live in the distiller, so they train with the student and are counted by ``extra_parameters``.
Layer pairs are indexed by position (``nn.ModuleList``): module names such as ``down.0`` hold dots, which
``nn.ModuleDict`` refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from harness.distill.base import Distiller, FeatureKDConfig, KDBatch


def projector(
    cin: int, cout: int, ndim: int = 4, kernel_size: int = 1, bn: bool = False, relu: bool = False
) -> nn.Module:
    """conv k x k (feature maps) or linear (vectors), optionally followed by batch norm and ReLU."""
    if ndim == 4:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=not bn)]
        layers += [nn.BatchNorm2d(cout)] if bn else []
    elif ndim == 2:
        layers = [nn.Linear(cin, cout, bias=not bn)] + ([nn.BatchNorm1d(cout)] if bn else [])
    else:
        raise ValueError(f"adapters map (N, C, H, W) maps or (N, D) vectors, not {ndim}-d tensors")
    layers += [nn.ReLU(inplace=True)] if relu else []
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def channel_adapter(s_shape: torch.Size, t_shape: torch.Size) -> nn.Module:
    """1x1 conv (or linear) from the student's channels to the teacher's; identity when they already match."""
    if s_shape[1] == t_shape[1]:
        return nn.Identity()
    return projector(s_shape[1], t_shape[1], ndim=len(s_shape))


def pair_shapes(
    d: Distiller, student_shapes, teacher_shapes, maps: bool = False
) -> list[tuple[torch.Size, torch.Size]]:
    """The probed (student, teacher) shapes per layer pair; ``maps``: both must be (N, C, H, W)."""
    method = d.cfg.method
    pairs = []
    for s, t in zip(d.student_layers, d.teacher_layers, strict=True):
        for name, shapes, who in ((s, student_shapes, "student"), (t, teacher_shapes, "teacher")):
            if name not in shapes:
                raise ValueError(
                    f"{method}: no probed shape for {who} layer '{name}' (have {sorted(shapes)}); "
                    "probe the layers choose_layers picked"
                )
        if len(student_shapes[s]) != len(teacher_shapes[t]):
            raise ValueError(
                f"{method}: student layer '{s}' gives {tuple(student_shapes[s])} but teacher layer '{t}' "
                f"{tuple(teacher_shapes[t])}; pair layers of the same kind (both maps or both vectors)"
            )
        if maps and len(student_shapes[s]) != 4:
            raise ValueError(
                f"{method}: needs feature maps (N, C, H, W) but layer '{s}' gives "
                f"{tuple(student_shapes[s])}; choose convolutional layers in kd.student_layers / "
                "kd.teacher_layers"
            )
        pairs.append((torch.Size(student_shapes[s]), torch.Size(teacher_shapes[t])))
    return pairs


def build_adapters(
    d: Distiller, student_shapes, teacher_shapes, make: Callable[..., nn.Module] = channel_adapter
) -> nn.ModuleList:
    return nn.ModuleList(make(s, t) for s, t in pair_shapes(d, student_shapes, teacher_shapes))


def feature_pairs(
    d: Distiller, batch: KDBatch, spatial: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) features per layer pair, float32, teacher detached; clear errors when unusable."""
    method = d.cfg.method
    if not d.student_layers:
        raise ValueError(f"{method}: no layers chosen; call choose_layers (and setup) before the first batch")
    pairs = []
    for s_name, t_name in zip(d.student_layers, d.teacher_layers, strict=True):
        s, t = batch.student_features.get(s_name), batch.teacher_features.get(t_name)
        for x, name, who, have in (
            (s, s_name, "student", batch.student_features),
            (t, t_name, "teacher", batch.teacher_features),
        ):
            if x is None:
                raise ValueError(
                    f"{method}: the batch has no {who} feature '{name}' (has {sorted(have)}); "
                    "tap the layers choose_layers picked"
                )
        if spatial and (s.dim() != 4 or t.dim() != 4):
            raise ValueError(
                f"{method}: needs feature maps (N, C, H, W) but got student '{s_name}' {tuple(s.shape)} and "
                f"teacher '{t_name}' {tuple(t.shape)}; choose convolutional layers in kd.student_layers / "
                "kd.teacher_layers"
            )
        if s.shape[0] != t.shape[0] or s.dim() != t.dim():
            raise ValueError(
                f"{method}: student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} do not "
                "pair up; feed both models the same batch and tap layers of the same kind"
            )
        pairs.append((s.float(), t.detach().float()))
    return pairs


def adapted_pairs(d: Distiller, batch: KDBatch, adapters: nn.ModuleList | None, spatial: bool = True):
    """feature_pairs with each pair's adapter: [(adapter, student, teacher), ...]."""
    pairs = feature_pairs(d, batch, spatial)
    if adapters is None or len(adapters) != len(pairs):
        raise ValueError(
            f"{d.cfg.method}: adapters not built for these layers; "
            "call setup(student_shapes, teacher_shapes) after choose_layers"
        )
    return [(a, s, t) for a, (s, t) in zip(adapters, pairs, strict=True)]


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by global average pooling; other shapes flattened to (N, D)."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


def pool_to(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """Average-pool a map so that neither side exceeds max_side (bounds m x m affinity matrices)."""
    h, w = x.shape[-2:]
    if h <= max_side and w <= max_side:
        return x
    return F.adaptive_avg_pool2d(x, (min(h, max_side), min(w, max_side)))


class EmbeddingKDConfig(FeatureKDConfig):
    """Methods on per-sample embeddings: the global average pool of tapped features, or the logits.

    ``auto`` uses features when layers are named in the config or the models name default ``kd_layers``,
    else the logits (classifiers without ``kd_layers``)."""

    source: Literal["auto", "features", "logits"] = "auto"

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == "logits" and (self.student_layers or self.teacher_layers):
            raise ValueError(
                f"{self.method}: source 'logits' taps no layers; "
                "drop student_layers/teacher_layers or set source: features"
            )
        return self


def choose_embedding_source(d: Distiller, student_defaults: list[str], teacher_defaults: list[str]) -> None:
    cfg = d.cfg
    named = bool(cfg.student_layers or cfg.teacher_layers)
    d.uses_teacher_logits = cfg.source == "logits" or (
        cfg.source == "auto" and not named and not (student_defaults and teacher_defaults)
    )
    if d.uses_teacher_logits:
        d.student_layers, d.teacher_layers = [], []
        return
    Distiller.choose_layers(d, student_defaults, teacher_defaults)
    if not d.student_layers:
        raise ValueError(
            f"{cfg.method}: source 'features' but the models name no kd_layers; "
            "set kd.student_layers and kd.teacher_layers, or kd.source: logits"
        )


def embeddings(d: Distiller, batch: KDBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) embeddings (N, D): pooled features per layer pair, or the pooled logits."""
    if d.uses_teacher_logits:
        if batch.teacher_logits is None:
            raise ValueError(f"{d.cfg.method}: source 'logits' needs the teacher's logits in the batch")
        s, t = batch.student_logits.float(), batch.teacher_logits.detach().float()
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{d.cfg.method}: {s.shape[0]} student samples but {t.shape[0]} teacher samples; "
                "feed both the same batch"
            )
        return [(global_pool(s), global_pool(t))]
    return [(global_pool(s), global_pool(t)) for s, t in feature_pairs(d, batch, spatial=False)]
