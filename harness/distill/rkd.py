"""``rkd``: relational KD (Park et al. 2019), distance and angle terms in RepDistiller's form.

On per-sample embeddings e (N, D): the global average pool of a tapped feature, or the logits.

    d_ij          = ||e_i - e_j||_2 / mean of the positive d over the batch
    rkd_distance  = w_d * smooth_l1( d(s), d(t) )                      (mean over the N x N pairs)
    cos_ijk       = < (e_i - e_j) / ||.||, (e_k - e_j) / ||.|| >
    rkd_angle     = w_a * smooth_l1( cos(s), cos(t) )                  (mean over the N^3 triplets)

Relations ignore the embedding width, so student and teacher may differ in channels. Reference weights:
w_d = 25, w_a = 50 (applied here; beta scales both).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.distill.adapters import EmbeddingKDConfig, choose_embedding_source, embeddings, pair_shapes
from harness.distill.base import KD_METHODS, Distiller


class RKDConfig(EmbeddingKDConfig):
    method: Literal["rkd"] = "rkd"
    distance_weight: float = Field(25.0, ge=0)
    angle_weight: float = Field(50.0, ge=0)


def normalised_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    d = d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # exact zeros on the diagonal
    mean = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mean.clamp(min=eps)


def angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # diff[j, i] = unit (e_i - e_j)
    return diff @ diff.transpose(1, 2)  # [j, i, k] = cos of the angle at e_j


@KD_METHODS.register(RKDConfig)
class RKD(Distiller):
    uses_teacher_logits = True

    def choose_layers(self, student_defaults, teacher_defaults):
        choose_embedding_source(self, student_defaults, teacher_defaults)

    def setup(self, student_shapes, teacher_shapes):
        pair_shapes(self, student_shapes, teacher_shapes)  # fail early on missing or unusable layers

    def forward(self, batch):
        dist, ang = 0.0, 0.0
        for s, t in embeddings(self, batch):
            dist = dist + F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))
            ang = ang + F.smooth_l1_loss(angles(s), angles(t))
        return {"rkd_distance": self.cfg.distance_weight * dist, "rkd_angle": self.cfg.angle_weight * ang}
