"""``attention``: attention transfer (Zagoruyko & Komodakis 2017), in RepDistiller's form.

    at(x) = normalize( flat( mean over channels of |x|^p ) )    (L2 per image, p = 2)
    at    = sum over layer pairs of mean( (at(s) - at(t))^2 )

Attention maps are channel-free, so no adapter is needed; the student's map (before flattening) is
bilinearly resized to the teacher's spatial size. Reference weight: beta = 1000.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from harness.distill.adapters import feature_pairs, pair_shapes
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class AttentionConfig(FeatureKDConfig):
    method: Literal["attention"] = "attention"
    beta: float = Field(1000.0, ge=0, description="weight of the KD terms")
    p: float = Field(2.0, gt=0, description="exponent of the activations in the attention map")


def attention_map(x, p: float, like=None):
    a = x.abs().pow(p).mean(dim=1, keepdim=True)
    if like is not None:
        a = match_spatial(a, like)
    return F.normalize(a.flatten(1), dim=1)


@KD_METHODS.register(AttentionConfig)
class AttentionKD(Distiller):
    def setup(self, student_shapes, teacher_shapes):
        pair_shapes(
            self, student_shapes, teacher_shapes, maps=True
        )  # fail early on missing or unusable layers

    def forward(self, batch):
        loss = 0.0
        for s, t in feature_pairs(self, batch):
            loss = loss + (attention_map(s, self.cfg.p, like=t) - attention_map(t, self.cfg.p)).pow(2).mean()
        return {"at": loss}
