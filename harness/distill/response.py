"""``response``: pixel-wise Hinton KD (Hinton et al. 2015; seeds 000, 001, 002).

    kd = T^2 * mean over pixels (and images) of KL( softmax(t / T) || softmax(s / T) )

KL is summed over classes at each pixel, then averaged over N*H*W pixels; for classification (no spatial
dims) that is the mean over the batch, so the same formula serves both tasks. The T^2 factor keeps the
gradient scale independent of T. Where student and teacher logits differ in size, the student's are
bilinearly resized to the teacher's (as in Knowledge Adaptation, seed 004).

All pixels count, ignore-labelled ones (255) included: the teacher's distribution is defined there too, and
the reference codebases (CIRKD, DIST) do not mask them either.

``standardize: true`` (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024) first
z-scores each pixel's logits over the classes, z -> (z - mean) / (std + 1e-7) with torch's (unbiased) std
as in the paper's code, for student and teacher alike; the student then matches the teacher's logit
relations, not their range. The loss becomes invariant to a per-pixel shift and positive scale of either.
With 2 classes it has nothing left to match: z-scored 2-class logits are always +-1/sqrt(2), so the term is
a constant whose gradient comes only through the eps (on random logits the largest gradient per logit is
about 1e-5, against 1e-2 without standardize); the method warns once when it sees 2 classes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field

from harness.distill.base import (
    KD_METHODS,
    Distiller,
    KDConfigBase,
    match_spatial,
    require_same_classes,
    warn_once,
)


class ResponseConfig(KDConfigBase):
    method: Literal["response"] = "response"
    temperature_field: ClassVar[str | None] = "temperature"
    knob_labels: ClassVar[dict[str, str]] = {**KDConfigBase.knob_labels, "temperature": "T"}

    temperature: float = Field(4.0, gt=0)
    standardize: bool = Field(False, description="z-score each pixel's logits over the classes first")


def zscore(logits, eps: float = 1e-7):
    """Per pixel (or sample): mean 0 and std 1 over the class dimension 1."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def warn_standardize(cfg: KDConfigBase, num_classes: int) -> None:
    if getattr(cfg, "standardize", False) and num_classes == 2:
        warn_once(
            f"kd.method {cfg.method}: standardize with 2 classes gives no gradient (z-scored 2-class logits "
            "are always +-1/sqrt(2), so the KD term is constant); set kd.standardize: false"
        )


def pixel_kl(student_logits, teacher_logits, temperature: float):
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(dim=1)
    return kl.mean() * temperature**2


@KD_METHODS.register(ResponseConfig)
class ResponseKD(Distiller):
    uses_teacher_logits = True

    def check_classes(self, num_classes):
        warn_standardize(self.cfg, num_classes)

    def forward(self, batch):
        s, t = batch.student_logits.float(), batch.teacher_logits.detach().float()
        require_same_classes(s, t, "response")
        self.check_classes(t.shape[1])
        if s.dim() == 4:
            s = match_spatial(s, t)
        if self.cfg.standardize:
            s, t = zscore(s), zscore(t)
        return {"kd": pixel_kl(s, t, self.cfg.temperature)}
