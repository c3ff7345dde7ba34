"""``cwd``: channel-wise distillation (Shu et al. 2021, CIRKD's form).

    p_c = softmax over the H*W positions of x_c / tau            (each channel c of each image)
    cwd = tau^2 / (N * C) * sum over images and channels of KL( p_c(t) || p_c(s) )

On the logits by default (reference: tau = 4, weight 3). With ``source: features`` it works on tapped
feature maps, with a 1x1 conv adapter on the student side when channel counts differ. The student's map
is bilinearly resized to the teacher's. Needs spatial maps: for classifiers use ``response``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.distill.adapters import adapted_pairs, build_adapters
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial, require_same_classes


class CWDConfig(FeatureKDConfig):
    method: Literal["cwd"] = "cwd"
    temperature_field: ClassVar[str | None] = "tau"
    knob_labels: ClassVar[dict[str, str]] = {**FeatureKDConfig.knob_labels, "tau": "τ"}

    beta: float = Field(3.0, ge=0, description="weight of the KD terms")
    tau: float = Field(4.0, gt=0)
    source: Literal["logits", "features"] = "logits"

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == "logits" and (self.student_layers or self.teacher_layers):
            raise ValueError(
                "cwd: source 'logits' taps no layers; "
                "drop student_layers/teacher_layers or set source: features"
            )
        return self


def channel_wise_kl(s, t, tau: float):
    n, c = t.shape[:2]
    log_p_s = F.log_softmax(s.flatten(2) / tau, dim=2)
    log_p_t = F.log_softmax(t.flatten(2) / tau, dim=2)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * tau**2 / (n * c)


@KD_METHODS.register(CWDConfig)
class CWDKD(Distiller):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.uses_teacher_logits = cfg.source == "logits"

    def choose_layers(self, student_defaults, teacher_defaults):
        if not self.uses_teacher_logits:
            super().choose_layers(student_defaults, teacher_defaults)

    def setup(self, student_shapes, teacher_shapes):
        self.adapters = build_adapters(self, student_shapes, teacher_shapes)

    def forward(self, batch):
        if self.uses_teacher_logits:
            if batch.teacher_logits is None:
                raise ValueError("cwd: source 'logits' needs the teacher's logits in the batch")
            s, t = batch.student_logits.float(), batch.teacher_logits.detach().float()
            require_same_classes(s, t, "cwd")
            if s.dim() != 4:
                raise ValueError(
                    f"cwd: needs spatial logits (N, K, H, W), got {tuple(s.shape)}; "
                    "for classification use kd.method: response"
                )
            return {"cwd": channel_wise_kl(match_spatial(s, t), t, self.cfg.tau)}
        loss = 0.0
        for adapter, s, t in adapted_pairs(self, batch, getattr(self, "adapters", None)):
            loss = loss + channel_wise_kl(match_spatial(adapter(s), t), t, self.cfg.tau)
        return {"cwd": loss}
