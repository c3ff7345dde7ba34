"""``adaptation``: Knowledge Adaptation for semantic segmentation (He et al., CVPR 2019; seed 004).

On one layer pair (by default the last tapped feature map of each model):

* ``prepare`` trains an autoencoder on the teacher's feature t for ``ae_epochs`` (SGD, lr 0.1, momentum
  0.9, weight decay 1e-4): three stride-2 3x3 conv + ReLU (encoder E), three transposed convs back
  (decoder D), loss mean((D(E(u)) - u)^2) + sparsity_weight * mean(|E(u)|) with u = t / rms, rms the
  root-mean-square of the first batch (fixed; without it lr 0.1 diverges on features of scale ~10).
  Then it is frozen.
* adapt    = adapt_weight * mean over positions and channels of (n(A(s)) - n(E(t)))^2, where A is a
             3x3 conv + BN + ReLU from the student's channels to the code's, its output bilinearly resized
             to the code's size, and n L2-normalises each position's channel vector.
* affinity = affinity_weight * mean over images and position pairs of (a_s - a_t)^2, where
             a_ij = cosine of the channel vectors at positions i and j (m x m, m = h*w) of the student map
             (resized to the teacher's) and of the teacher map, both average-pooled to at most
             affinity_max_side per side to bound the m^2 memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.distill.adapters import feature_pairs, pair_shapes, pool_to, projector
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, KDBatch, match_spatial


class AdaptationConfig(FeatureKDConfig):
    method: Literal["adaptation"] = "adaptation"
    num_layers: Literal[1] = 1
    adapt_weight: float = Field(50.0, ge=0)
    affinity_weight: float = Field(1.0, ge=0)
    code_channels: int | None = Field(None, ge=1, description="code channels; default the teacher's")
    ae_stride: int = Field(2, ge=1, description="stride of each of the three encoder convs")
    ae_epochs: int = Field(1, ge=1)
    ae_lr: float = Field(0.1, gt=0)
    ae_momentum: float = Field(0.9, ge=0, le=1)
    ae_weight_decay: float = Field(1e-4, ge=0)
    sparsity_weight: float = Field(1e-7, ge=0)
    affinity_max_side: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _one_pair(self):
        if len(self.student_layers or []) > 1 or len(self.teacher_layers or []) > 1:
            raise ValueError(
                "adaptation: works on one layer pair; give one name in student_layers and teacher_layers"
            )
        return self


class AutoEncoder(nn.Module):
    def __init__(self, cin: int, code: int, stride: int):
        super().__init__()
        enc, dec = [], []
        for i in range(3):
            enc += [nn.Conv2d(cin if i == 0 else code, code, 3, stride, padding=1), nn.ReLU(inplace=True)]
            cout = cin if i == 2 else code
            dec += [nn.ConvTranspose2d(code, cout, 3, stride, padding=1, output_padding=stride - 1)]
            dec += [nn.ReLU(inplace=True)] if i < 2 else []
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.register_buffer("scale", torch.ones(()))  # RMS of the first training batch

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        return self.encoder(t / self.scale)

    def losses(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t / self.scale
        code = self.encoder(t)
        return F.mse_loss(match_spatial(self.decoder(code), t), t), code.abs().mean()


def affinity(x: torch.Tensor) -> torch.Tensor:
    v = F.normalize(x.flatten(2), dim=1)
    return v.transpose(1, 2) @ v


@KD_METHODS.register(AdaptationConfig)
class AdaptationKD(Distiller):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("prepared", torch.tensor(False))  # saved with the state, unlike a flag
        self._ready = False
        self.register_load_state_dict_post_hook(lambda module, _keys: module._freeze_if_prepared())

    def _freeze_if_prepared(self) -> None:
        self._ready = bool(self.prepared)
        if self._ready:
            self.autoencoder.eval().requires_grad_(False)

    def setup(self, student_shapes, teacher_shapes):
        pairs = pair_shapes(self, student_shapes, teacher_shapes, maps=True)
        if len(pairs) != 1:
            raise ValueError(
                f"adaptation: needs exactly one layer pair, got {len(pairs)}; call choose_layers first"
            )
        ((s, t),) = pairs
        code = self.cfg.code_channels or t[1]
        self.autoencoder = AutoEncoder(t[1], code, self.cfg.ae_stride)
        self.adapter = projector(s[1], code, kernel_size=3, bn=True, relu=True)

    def prepare(self, teacher_batches, device):
        cfg, layer = self.cfg, self.teacher_layers[0]
        ae = self.autoencoder.to(device).train().requires_grad_(True)
        opt = torch.optim.SGD(ae.parameters(), cfg.ae_lr, cfg.ae_momentum, weight_decay=cfg.ae_weight_decay)
        first = last = None
        for _ in range(cfg.ae_epochs):
            for batch in teacher_batches():
                if layer not in batch.teacher_features:
                    raise ValueError(f"adaptation: prepare needs teacher feature '{layer}' in every batch")
                t = batch.teacher_features[layer].detach().float().to(device)
                if first is None:
                    ae.scale.copy_(t.pow(2).mean().sqrt().clamp(min=1e-6))
                rec, sparse = ae.losses(t)
                opt.zero_grad(set_to_none=True)
                (rec + cfg.sparsity_weight * sparse).backward()
                opt.step()
                first, last = rec.detach() if first is None else first, rec.detach()
        if first is None:
            raise ValueError(
                "adaptation: prepare got no batches of teacher features; is the training split empty?"
            )
        if not torch.isfinite(last):
            raise ValueError(
                f"adaptation: the autoencoder diverged (recon loss {last.item()}); lower kd.ae_lr"
            )
        opt.zero_grad(set_to_none=True)
        self.prepared.fill_(True)
        self._freeze_if_prepared()
        return {"ae/recon_first": first.item(), "ae/recon": last.item()}

    def train(self, mode: bool = True):
        super().train(mode)
        if self._ready:
            self.autoencoder.eval()
        return self

    def forward(self, batch: KDBatch):
        if not self._ready:
            raise ValueError(
                "adaptation: the autoencoder is untrained; "
                "call distiller.prepare(teacher_batches, device) before training"
            )
        ((s, t),) = feature_pairs(self, batch)
        code = F.normalize(self.autoencoder.encode(t), dim=1)
        adapted = F.normalize(match_spatial(self.adapter(s), code), dim=1)
        side = self.cfg.affinity_max_side
        aff = (affinity(pool_to(match_spatial(s, t), side)) - affinity(pool_to(t, side))).pow(2).mean()
        return {
            "adapt": self.cfg.adapt_weight * (adapted - code).pow(2).mean(),
            "affinity": self.cfg.affinity_weight * aff,
        }
