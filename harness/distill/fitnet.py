"""``fitnet``: FitNets hints (Romero et al. 2015), in RepDistiller's form.

    hint = sum over layer pairs of mean( (R(s) - t)^2 )

R is a regressor: conv (1x1 or 3x3) + batch norm from the student's channels to the teacher's (linear +
batch norm for (N, D) features); its output is bilinearly resized to the teacher's map. Reference
weight: beta = 100.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from harness.distill.adapters import adapted_pairs, build_adapters, projector
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class FitNetConfig(FeatureKDConfig):
    method: Literal["fitnet"] = "fitnet"
    beta: float = Field(100.0, ge=0, description="weight of the KD terms")
    kernel_size: Literal[1, 3] = 1


@KD_METHODS.register(FitNetConfig)
class FitNetKD(Distiller):
    def setup(self, student_shapes, teacher_shapes):
        def regressor(s, t):
            return projector(s[1], t[1], ndim=len(s), kernel_size=self.cfg.kernel_size, bn=True)

        self.regressors = build_adapters(self, student_shapes, teacher_shapes, regressor)

    def forward(self, batch):
        loss = 0.0
        for regressor, s, t in adapted_pairs(self, batch, getattr(self, "regressors", None), spatial=False):
            s = regressor(s)
            s = match_spatial(s, t) if s.dim() == 4 else s
            if s.shape != t.shape:
                raise ValueError(
                    f"fitnet: regressed student feature {tuple(s.shape)} does not match the teacher's "
                    f"{tuple(t.shape)}; re-run setup with the probed shapes"
                )
            loss = loss + F.mse_loss(s, t)
        return {"hint": loss}
