"""``feature_cosine``: cosine feature KD (seed 000).

    cosine = sum over layer pairs of mean over images of 1 - cos( flat(A(s)), flat(t) )

Each image's feature map is flattened to one vector. A is a 1x1 conv adapter on the student side when the
channel counts differ (identity otherwise); the adapted map is bilinearly resized to the teacher's size.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from harness.distill.adapters import adapted_pairs, build_adapters
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class FeatureCosineConfig(FeatureKDConfig):
    method: Literal["feature_cosine"] = "feature_cosine"


@KD_METHODS.register(FeatureCosineConfig)
class FeatureCosineKD(Distiller):
    def setup(self, student_shapes, teacher_shapes):
        self.adapters = build_adapters(self, student_shapes, teacher_shapes)

    def forward(self, batch):
        loss = 0.0
        for adapter, s, t in adapted_pairs(self, batch, getattr(self, "adapters", None), spatial=False):
            s = adapter(s)
            s = match_spatial(s, t) if s.dim() == 4 else s
            loss = loss + (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()
        return {"cosine": loss}
