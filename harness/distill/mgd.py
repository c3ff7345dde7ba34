"""``mgd``: masked generative distillation (Yang et al., ECCV 2022), as in the paper's segmentation code.

    a   = A(s), bilinearly resized to t's size   A = 1x1 conv to the teacher's channels, only when they differ
    m   = 0 at each spatial position with probability lambda (0.75), else 1; one draw per image and position,
          shared by the channels, fresh at every call (torch's global RNG, which the trainer seeds)
    mgd = sum over layer pairs of mean( (G(a * m) - t)^2 ),  G = conv3x3 -> ReLU -> conv3x3 (teacher channels)

Layers: by default the backbone's last stage, which the paper's segmentation code distils: the models'
``kd_layers`` up to the decoder (the k-UNet's ``bottleneck``, dilated_br's ``enc.3``, smp's last encoder
stage; torchvision's tap the backbone only), ``num_layers`` of them counted back from there. Each layer
pair has its own A and G, and the pairs' terms are summed with weight 1 each.

Normalisation: the paper sums the squared error and divides by the batch size N, alpha 2e-5 (Cityscapes,
2048 x 64 x 64 teacher features). alpha * sum / N = (alpha * C*H*W) * mean, so we keep the per-element mean
(like ``fitnet``; it does not grow with the feature size) and rescale alpha by C*H*W: 168 in the paper's
setting, 0.08 for digits_seg's k=16 teacher at its bottleneck (256 x 4 x 4). Our default beta is 1: at the
start the term is about the teacher feature's mean square (measured 0.51 at that bottleneck, trained
teacher, first training batch), so of order 1 next to the CE. At the bottleneck G holds 2 x 9 x C^2 weights
(1.2 M for the k=16 teacher's 256 channels) but costs the same FLOPs as at the last decoder stage: C^2*H*W
is the same at every level of a k-UNet.
A and G train with the student and are counted apart (``kd_params``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from harness.distill.adapters import adapted_pairs, channel_adapter, pair_shapes
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class MGDConfig(FeatureKDConfig):
    method: Literal["mgd"] = "mgd"
    beta: float = Field(
        1.0, ge=0, description="weight of the KD terms (the paper's alpha, rescaled: see docstring)"
    )
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="the paper's lambda: share of positions zeroed")


def generator(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


DECODER_TAPS = ("up.", "dec.", "net.decoder")  # the k-UNet's, dilated_br's and smp's decoder stages


def encoder_taps(names: list[str]) -> list[str]:
    """A model's default taps without its decoder's: the k-UNet's end at ``bottleneck``, dilated_br's at
    ``enc.3``, smp's at the encoder's last stage; torchvision's tap only the backbone already."""
    return [n for n in names if not n.startswith(DECODER_TAPS)] or list(names)


@KD_METHODS.register(MGDConfig)
class MGDKD(Distiller):
    def choose_layers(self, student_defaults, teacher_defaults):
        # The paper's segmentation code distils the backbone's last stage, not the decoder's output.
        super().choose_layers(encoder_taps(student_defaults), encoder_taps(teacher_defaults))

    def setup(self, student_shapes, teacher_shapes):
        pairs = pair_shapes(self, student_shapes, teacher_shapes, maps=True)
        self.aligners = nn.ModuleList(channel_adapter(s, t) for s, t in pairs)
        self.generators = nn.ModuleList(generator(t[1]) for _, t in pairs)

    def generated(self, batch):
        """(teacher feature regenerated from the masked, aligned student feature, teacher feature) per tapped
        pair: random positions are zeroed where rand > 1 - mask_ratio (the paper's draw)."""
        for i, (align, s, t) in enumerate(adapted_pairs(self, batch, getattr(self, "aligners", None))):
            a = match_spatial(align(s), t)
            if a.shape != t.shape:
                raise ValueError(
                    f"{self.cfg.method}: aligned student feature {tuple(a.shape)} does not match the "
                    f"teacher's {tuple(t.shape)}; re-run setup with the probed shapes"
                )
            n, _, h, w = t.shape
            keep = torch.rand(n, 1, h, w, device=t.device) <= 1 - self.cfg.mask_ratio
            yield self.generators[i](a * keep), t

    def forward(self, batch):
        loss = 0.0
        for g, t in self.generated(batch):
            loss = loss + (g - t).pow(2).mean()
        return {"mgd": loss}
