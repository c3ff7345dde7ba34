"""``pairwise``: pair-wise distillation of structured KD (Liu et al. 2019, SKD/CIRKD form).

    nodes  = max-pool the map with a window of pool_scale x its size (ceil mode), then L2-normalise each
             node's channel vector
    a_ij   = <node_i, node_j>                                      (m x m per image, m = nodes)
    pair   = sum over layer pairs of  sum_ij (a_s - a_t)^2 / m^2, averaged over the batch

The student's map is bilinearly resized to the teacher's first; similarity matrices ignore the channel
count, so no adapter is needed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.distill.adapters import feature_pairs, pair_shapes
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class PairwiseConfig(FeatureKDConfig):
    method: Literal["pairwise"] = "pairwise"
    pool_scale: float = Field(
        0.5, gt=0, le=1, description="node window as a fraction of the map's height and width"
    )


def node_similarity(x: torch.Tensor) -> torch.Tensor:
    nodes = F.normalize(x.flatten(2), dim=1)  # (N, C, m), unit vectors per node
    return nodes.transpose(1, 2) @ nodes


@KD_METHODS.register(PairwiseConfig)
class PairwiseKD(Distiller):
    def setup(self, student_shapes, teacher_shapes):
        pair_shapes(
            self, student_shapes, teacher_shapes, maps=True
        )  # fail early on missing or unusable layers

    def forward(self, batch):
        loss = 0.0
        for s, t in feature_pairs(self, batch):
            h, w = t.shape[-2:]
            window = (
                max(1, math.floor(h * self.cfg.pool_scale)),
                max(1, math.floor(w * self.cfg.pool_scale)),
            )
            s, t = (F.max_pool2d(x, window, window, ceil_mode=True) for x in (match_spatial(s, t), t))
            m = t.shape[-2] * t.shape[-1]
            loss = loss + (node_similarity(s) - node_similarity(t)).pow(2).sum() / m**2 / t.shape[0]
        return {"pair": loss}
