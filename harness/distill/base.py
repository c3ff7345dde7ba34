"""The one interface every KD method implements.

A method is a ``Distiller``: an nn.Module built from its config that

* names the intermediate features it needs (``student_layers`` / ``teacher_layers``, module names as in
  ``named_modules()``) and whether it needs the teacher's logits (``uses_teacher_logits``);
* builds its own trainable parts (adapters, regressors) in ``setup`` from the probed feature shapes; they
  are trained with the student and counted apart from it (``extra_parameters``);
* may train frozen helpers before the student's training starts (``prepare``: the adaptation method's
  autoencoder);
* may warn about settings that cannot work for the task's number of classes (``check_classes``, called at
  setup and on every batch; each warning is printed once per process);
* returns its loss terms as a dict of scalars in ``forward``. It receives the teacher's outputs as inputs and
  never calls the teacher, so the trainer can serve them live or from a cache.

The trainer combines the terms as ``total = alpha * CE + beta * sum(terms)``, with alpha and beta set per
epoch by the regime and schedule of ``KDConfigBase``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from harness.registry import Registry

KD_METHODS = Registry("KD method", "method")
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warning: <message>`` on stderr, once per process (a study builds one distiller per trial and seed)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


class WeightStep(BaseModel):
    """From ``epoch`` on (0-based), use these weights (seed 000 moved alpha from 5 to 1 at epoch 25)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0)
    alpha: float | None = Field(None, ge=0)
    beta: float | None = Field(None, ge=0)


class KDConfigBase(BaseModel):
    """Fields every method shares: how hard-label CE and the KD terms are weighted over training.

    Regimes (seed 002): ``mixed`` alpha*CE + beta*KD; ``soft`` KD only; ``hard`` CE only;
    ``sequential`` KD only for ``soft_epochs`` epochs, then CE only.
    """

    model_config = ConfigDict(extra="forbid")
    # What the report shows of a method: the field it plots and tabulates as the KD temperature (if any),
    # and short column labels for its knobs.
    temperature_field: ClassVar[str | None] = None
    knob_labels: ClassVar[dict[str, str]] = {"alpha": "α", "beta": "β"}

    alpha: float = Field(1.0, ge=0, description="weight of the hard-label cross-entropy")
    beta: float = Field(1.0, ge=0, description="weight of the KD terms")
    regime: Literal["mixed", "soft", "hard", "sequential"] = "mixed"
    soft_epochs: int = Field(0, ge=0, description="sequential regime: epochs of soft training first")
    schedule: list[WeightStep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_regime(self):
        if self.regime == "sequential" and self.soft_epochs == 0:
            raise ValueError(
                "regime 'sequential' needs soft_epochs >= 1 (epochs of soft training before hard)"
            )
        return self

    def weights(self, epoch: int) -> tuple[float, float]:
        alpha, beta = self.alpha, self.beta
        for step in sorted(self.schedule, key=lambda s: s.epoch):
            if epoch >= step.epoch:
                alpha = step.alpha if step.alpha is not None else alpha
                beta = step.beta if step.beta is not None else beta
        if self.regime == "soft" or (self.regime == "sequential" and epoch < self.soft_epochs):
            return 0.0, beta
        if self.regime == "hard" or self.regime == "sequential":
            return alpha, 0.0
        return alpha, beta


class FeatureKDConfig(KDConfigBase):
    """For methods that tap intermediate features. Layers pair up in order; unset means the models'
    default ``kd_layers``, deepest first, as many as ``num_layers``."""

    student_layers: list[str] | None = None
    teacher_layers: list[str] | None = None
    num_layers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_layers(self):
        s, t = self.student_layers, self.teacher_layers
        if s is not None and t is not None and len(s) != len(t):
            raise ValueError(
                f"student_layers has {len(s)} names but teacher_layers has {len(t)}; they pair up in order"
            )
        return self


@dataclass
class KDBatch:
    student_logits: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    ignore_index: int = 255


class Distiller(nn.Module):
    uses_teacher_logits: bool = False

    def __init__(self, cfg: KDConfigBase):
        super().__init__()
        self.cfg = cfg
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []

    @property
    def needs_teacher(self) -> bool:
        return self.uses_teacher_logits or bool(self.teacher_layers)

    def choose_layers(self, student_defaults: list[str], teacher_defaults: list[str]) -> None:
        """Resolve which features to tap. Feature methods call this from their config; others tap nothing."""
        cfg = self.cfg
        if not isinstance(cfg, FeatureKDConfig):
            return
        n = cfg.num_layers
        self.student_layers = list(cfg.student_layers or student_defaults[::-1][:n][::-1])
        self.teacher_layers = list(cfg.teacher_layers or teacher_defaults[::-1][:n][::-1])
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(
                f"{len(self.student_layers)} student layers but {len(self.teacher_layers)} teacher layers; "
                "set kd.student_layers and kd.teacher_layers to lists of equal length"
            )

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Build adapters once the feature shapes (N, C, H, W) of the tapped layers are known."""

    def check_classes(self, num_classes: int) -> None:
        """Warn (``warn_once``) about settings that do not work with ``num_classes`` classes."""

    def prepare(
        self, teacher_batches: Callable[[], Iterable[KDBatch]], device: torch.device
    ) -> dict[str, float]:
        """Train frozen helpers on the teacher's outputs before the student's training;
        return metrics to log."""
        return {}

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, batch: KDBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def match_spatial(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize x (N, C, H, W) to like's H, W when they differ."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def require_same_classes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, method: str) -> None:
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"{method}: student predicts {student_logits.shape[1]} classes but the teacher "
            f"{teacher_logits.shape[1]}; train the teacher on the same dataset"
        )


def temperature_keys() -> list[str]:
    """Config keys (``kd.<field>``) that methods declare as their temperature."""
    fields = {cls.temperature_field for cls in KD_METHODS.config_classes()}
    return sorted(f"kd.{f}" for f in fields if f)


def knob_labels() -> dict[str, str]:
    """Column labels of the KD methods' knobs, by config key (``kd.temperature`` -> ``T``)."""
    return {f"kd.{k}": v for cls in KD_METHODS.config_classes() for k, v in cls.knob_labels.items()}
