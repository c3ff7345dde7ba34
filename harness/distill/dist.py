"""``dist``: DIST, relation matching from a stronger teacher (Huang et al., NeurIPS 2022), segmentation form.

    p = softmax(z / tau) over the classes, at every pixel; rows are the M = N*H*W pixels,
        columns the K classes
    inter = tau^2 * (1 - mean over the M pixels of pearson(p_s[m, :], p_t[m, :]))
    intra = tau^2 * (1 - mean over the K classes of pearson(p_s[:, k], p_t[:, k]))

The trainer adds them as beta_inter * inter + beta_intra * intra (``inter_weight``, ``intra_weight``, the
paper's beta and gamma, 1 each) times ``kd.beta``. As in the paper's segmentation code (hunto/DIST_KD):
tau 1, all pixels of the batch, ignore-labelled ones included (as ``response``), and eps 1e-8 in the
correlation's denominator. Classification logits (N, K) give M = N rows. The student's logits are
bilinearly resized to the teacher's. ``standardize: true`` z-scores each pixel's logits first, as in
``response`` (Sun et al., CVPR 2024).

With 2 classes the inter-class term is nearly constant: a pixel's two probabilities sum to 1, so the
Pearson correlation of (p, 1 - p) and (q, 1 - q) is +-1 (the sign of (p - 1/2)(q - 1/2)) and the term just
counts the pixels whose argmax disagrees, with no useful gradient; only the intra-class term teaches.
The method warns once when it sees 2 classes (and about ``standardize``, as ``response``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from harness.distill.base import (
    KD_METHODS,
    Distiller,
    KDConfigBase,
    match_spatial,
    require_same_classes,
    warn_once,
)
from harness.distill.response import warn_standardize, zscore


class DISTConfig(KDConfigBase):
    method: Literal["dist"] = "dist"
    temperature_field: ClassVar[str | None] = "tau"
    knob_labels: ClassVar[dict[str, str]] = {**KDConfigBase.knob_labels, "tau": "τ"}

    tau: float = Field(1.0, gt=0, description="softmax temperature (the paper's segmentation setting: 1)")
    inter_weight: float = Field(1.0, ge=0, description="the paper's beta: weight of the inter-class term")
    intra_weight: float = Field(1.0, ge=0, description="the paper's gamma: weight of the intra-class term")
    standardize: bool = Field(False, description="z-score each pixel's logits over the classes first")


def mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between a[i, :] and b[i, :]."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


@KD_METHODS.register(DISTConfig)
class DISTKD(Distiller):
    uses_teacher_logits = True

    def check_classes(self, num_classes):
        warn_standardize(self.cfg, num_classes)
        if num_classes == 2 and self.cfg.inter_weight > 0:
            warn_once(
                "kd.method dist: with 2 classes the inter-class term is nearly constant (the Pearson "
                "correlation of two 2-class distributions is +-1), so only the intra-class term teaches; "
                "set kd.inter_weight: 0 to drop it"
            )

    def forward(self, batch):
        s, t = batch.student_logits.float(), batch.teacher_logits.detach().float()
        require_same_classes(s, t, "dist")
        self.check_classes(t.shape[1])
        if s.dim() not in (2, 4) or s.dim() != t.dim():
            raise ValueError(
                f"dist: needs logits (N, K, H, W) or (N, K) of the same kind, got student {tuple(s.shape)} "
                f"and teacher {tuple(t.shape)}"
            )
        if s.dim() == 4:
            s = match_spatial(s, t)
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"dist: {s.shape[0]} student images but {t.shape[0]} teacher images; feed both the same batch"
            )
        if self.cfg.standardize:
            s, t = zscore(s), zscore(t)
        k, tau = t.shape[1], self.cfg.tau
        p_s = torch.softmax(s / tau, dim=1).movedim(1, -1).reshape(-1, k)
        p_t = torch.softmax(t / tau, dim=1).movedim(1, -1).reshape(-1, k)
        return {
            "inter": self.cfg.inter_weight * tau**2 * (1 - mean_pearson(p_s, p_t)),
            "intra": self.cfg.intra_weight * tau**2 * (1 - mean_pearson(p_s.T, p_t.T)),
        }
