"""``afdcd``: augmentation-free dense contrastive distillation (Fan et al., NeurIPS 2023; code OSVAI/Af-DCD).

    a   = A(s), bilinearly resized to t's size   A = 1x1 conv to the teacher's channels, only when they differ
    m   = 0 at each spatial position with probability ``mask_ratio`` (0.75), else 1; one draw per image and
          position, shared by the channels, fresh at every call (torch's global RNG, which the trainer seeds)
    g   = G(a * m)                              G = conv3x3 -> ReLU -> conv3x3 (``projector: basic``), or
          ``enhanced``: x1 = ReLU(conv3x3(x)), x2 = ReLU(conv3x3(x1)), g = (conv3x3(x1) + conv3x3'(x2)) / 2
    fd  = fd_weight * mean( (g - t)^2 )
    ctr = ctr_weight * M * mean over anchors of CE, the omni-contrastive term on g against t:
          max-pool both by ``pool_size``, cut them into ``patch_size`` x ``patch_size`` patches and the
          channels into M = ``channel_groups`` groups of C/M; within a patch the tokens are (position i,
          group k), a vector of C/M values. For the student token (i, k), the positive is the teacher's (i, k)
          and the negatives are the teacher's tokens (j, k') of every other group k' != k (j any position of
          the patch); similarity -||g_ik - t_jk'||_1 / tau, CE = -log softmax of the positive.
          M * mean CE is the reference's sum over anchors / (N * H * W).

Layers: as ``mgd``, the backbone's last stage (the reference taps the ResNet's c4). Each layer pair has its
own A and G; pairs' terms are summed. A and G train with the student, are counted in ``kd_params``, and their
forward and backward FLOPs enter ``train_flops`` (the distiller is measured like every method; the L1
distances are element-wise work the FLOP counter does not see). At the reference's 2048 channels G holds
2 x 9 x 2048^2 = 75 M weights.

Small maps: the reference pools by 4 and cuts 4 x 4 patches of its 64 x 128 Cityscapes map. Here the pooling
applies only when both sides reach pool_size x patch_size (else none), the patch side is at most the map's
smaller side, and rows and columns that do not fill a patch are cropped (as the reference does for CamVid):
digits_seg's teacher bottleneck (2 x 2) is one patch of 2 x 2.

Weights: the reference's lambda_fd multiplies sum / N (2e-6 on Cityscapes' 2048 x 64 x 128 map, 33.6 on our
per-element mean; 1e-6 on VOC's 2048 x 64 x 64, 8.4); like ``mgd`` we keep the mean (it does not grow with
the feature) at weight 1, so the term starts near the teacher feature's mean square. ctr_weight 0.005 and tau
0.07 are the reference's (its normalisation is kept, so the weight carries over). Its released Cityscapes
script passes --rand_mask False --enhance_projector True, flags its parser does not define (it has
--rand-mask / --enhance-projector, type=bool); we keep the parser's defaults (random mask, basic projector).
The reference clips the gradient norm of A and G at 15; we do not (the trainer has one optimizer).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.distill.adapters import channel_adapter, pair_shapes
from harness.distill.base import KD_METHODS, FeatureKDConfig
from harness.distill.mgd import MGDKD, generator


class AfDCDConfig(FeatureKDConfig):
    method: Literal["afdcd"] = "afdcd"
    temperature_field: ClassVar[str | None] = "tau"
    knob_labels: ClassVar[dict[str, str]] = {**FeatureKDConfig.knob_labels, "tau": "τ"}

    tau: float = Field(0.07, gt=0, description="temperature of the omni-contrastive softmax")
    fd_weight: float = Field(1.0, ge=0, description="weight of the masked-feature MSE (per-element mean)")
    ctr_weight: float = Field(0.005, ge=0, description="weight of the omni-contrastive term")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="share of positions zeroed")
    channel_groups: int = Field(16, ge=2, description="M: channel groups per token")
    pool_size: int = Field(4, ge=1, description="max-pool window before the patches (when the map allows)")
    patch_size: int = Field(4, ge=1, description="side of a patch, at most the map's smaller side")
    projector: Literal["basic", "enhanced"] = "basic"


class EnhancedProjector(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adapt_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adapt_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x1 = self.block_1(x)
        return (self.adapt_1(x1) + self.adapt_2(self.block_2(x1))) / 2


def to_tokens(x: torch.Tensor, patch: int, groups: int) -> torch.Tensor:
    """(N, C, H, W) with H, W multiples of ``patch`` -> (N * patches, patch^2 * groups, C / groups); token
    index = position * groups + group, positions in row-major order within the patch."""
    n, c, h, w = x.shape
    x = x.reshape(n, groups, c // groups, h // patch, patch, w // patch, patch)
    return x.permute(0, 3, 5, 4, 6, 1, 2).reshape(-1, patch * patch * groups, c // groups)


def patch_layout(h: int, w: int, pool: int, patch: int) -> tuple[int, int]:
    """(pool window, patch side) for an h x w map: pooling only where both sides reach pool * patch."""
    pool = pool if pool > 1 and min(h, w) >= pool * patch else 1
    return pool, min(patch, h // pool, w // pool)


def omni_contrast(g: torch.Tensor, t: torch.Tensor, tau: float, groups: int, pool: int, patch: int):
    pool, patch = patch_layout(*t.shape[-2:], pool, patch)
    if pool > 1:
        g, t = F.max_pool2d(g, pool), F.max_pool2d(t, pool)
    h, w = (t.shape[-2] // patch) * patch, (t.shape[-1] // patch) * patch
    g, t = to_tokens(g[..., :h, :w], patch, groups), to_tokens(t[..., :h, :w], patch, groups)
    logits = -torch.cdist(g, t, p=1) / tau  # (patches, tokens, tokens): student rows, teacher columns
    group = torch.arange(logits.shape[-1], device=g.device) % groups
    same = group[:, None] == group[None, :]
    positive = torch.eye(len(group), dtype=torch.bool, device=g.device)
    logits = logits.masked_fill(same & ~positive, float("-inf"))  # same group elsewhere: not a negative
    ce = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=-2, dim2=-1)
    return groups * ce.mean()


@KD_METHODS.register(AfDCDConfig)
class AfDCDKD(MGDKD):
    def setup(self, student_shapes, teacher_shapes):
        pairs = pair_shapes(self, student_shapes, teacher_shapes, maps=True)
        groups = self.cfg.channel_groups
        for (_, t), name in zip(pairs, self.teacher_layers, strict=True):
            if t[1] % groups:
                raise ValueError(
                    f"afdcd: teacher layer '{name}' has {t[1]} channels, not a multiple of "
                    f"kd.channel_groups {groups}; set kd.channel_groups to a divisor of {t[1]}"
                )
        make = EnhancedProjector if self.cfg.projector == "enhanced" else generator
        self.aligners = nn.ModuleList(channel_adapter(s, t) for s, t in pairs)
        self.generators = nn.ModuleList(make(int(t[1])) for _, t in pairs)

    def forward(self, batch):
        cfg = self.cfg
        fd = ctr = 0.0
        for g, t in self.generated(batch):  # MGD's masked generation, the reference's draw
            fd = fd + (g - t).pow(2).mean()
            ctr = ctr + omni_contrast(g, t, cfg.tau, cfg.channel_groups, cfg.pool_size, cfg.patch_size)
        return {"fd": cfg.fd_weight * fd, "ctr": cfg.ctr_weight * ctr}
