"""``triplet``: triplet-loss KD (Oki et al. 2020; seed 003).

On per-sample embeddings (pooled tapped features, or the logits), with a linear adapter on the student
side when the widths differ:

    triplet = mean over anchors a of max(0, m + ||t(a) - s(a)||^2 - ||t(a) - s(n)||^2)

n is a random sample of the batch with a different class (``sample_negatives``). A sample's class is its
label (classification) or, for segmentation, the most frequent class of its pixels other than background
and ignore (background when it has no other pixels). Anchors with no other-class sample in the batch are
left out; a batch with none gives 0. ``sample_triplets`` is seed 003's anchor / positive / negative sampler
(positive: another sample of the anchor's class), for losses that need positives.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from harness.distill.adapters import (
    EmbeddingKDConfig,
    build_adapters,
    channel_adapter,
    choose_embedding_source,
    embeddings,
)
from harness.distill.base import KD_METHODS, Distiller


class TripletConfig(EmbeddingKDConfig):
    method: Literal["triplet"] = "triplet"
    margin: float = Field(1.0, ge=0)
    background_class: int | None = Field(
        0, description="segmentation: class not counted when labelling an image"
    )


def image_labels(targets: torch.Tensor, ignore_index: int = 255, background: int | None = 0) -> torch.Tensor:
    """(N,) class labels as they are; (N, H, W) masks -> each image's most frequent class other than ignore
    and background (ties: the lower class); background if it has no other pixel, -1 if it has none at all."""
    if targets.dim() == 1:
        return targets.long()
    labels = []
    for row in targets.flatten(1).long():
        row = row[row != ignore_index]
        fg = row[row != background] if background is not None else row
        if fg.numel():
            labels.append(torch.bincount(fg).argmax())
        else:
            labels.append(torch.tensor(background if row.numel() else -1, device=row.device))
    return torch.stack(labels)


def sample_negatives(
    targets: torch.Tensor,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    background: int | None = 0,
) -> torch.Tensor:
    """For each sample, the index of a random other-class sample of the batch, or -1 where there is none
    (or the sample has no label). Samples on the CPU, so a CPU generator serves any device."""
    labels = image_labels(targets, ignore_index, background).cpu()
    other = (labels[None, :] != labels[:, None]) & (labels[None, :] >= 0) & (labels[:, None] >= 0)
    valid = other.any(1)
    weights = torch.where(valid[:, None], other.float(), torch.ones_like(other, dtype=torch.float))
    idx = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(valid, idx, torch.full_like(idx, -1)).to(targets.device)


def sample_triplets(
    targets: torch.Tensor,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    background: int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed 003's anchor / positive / negative sampler, within a batch: index tensors (anchor, positive,
    negative) of equal length, one triplet per sample that has another sample of its class (the positive,
    a different sample) and a sample of another class (the negative), both drawn uniformly. Samples without
    a label (see ``image_labels``) take no part. The loss above (Oki's E_ourKD) needs only anchors and
    negatives; the positives serve metric-learning triplet losses."""
    labels = image_labels(targets, ignore_index, background).cpu()
    known = labels >= 0
    pair = known[:, None] & known[None, :]
    same = (labels[:, None] == labels[None, :]) & pair & ~torch.eye(len(labels), dtype=torch.bool)
    other = (labels[:, None] != labels[None, :]) & pair
    anchor = (same.any(1) & other.any(1)).nonzero().squeeze(1)
    if anchor.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=targets.device)
        return empty, empty.clone(), empty.clone()
    positive = torch.multinomial(same[anchor].float(), 1, generator=generator).squeeze(1)
    negative = torch.multinomial(other[anchor].float(), 1, generator=generator).squeeze(1)
    return tuple(t.to(targets.device) for t in (anchor, positive, negative))


@KD_METHODS.register(TripletConfig)
class TripletKD(Distiller):
    uses_teacher_logits = True

    def choose_layers(self, student_defaults, teacher_defaults):
        choose_embedding_source(self, student_defaults, teacher_defaults)

    def setup(self, student_shapes, teacher_shapes):
        # linear on the pooled (N, C) embeddings (= a 1x1 conv before the pooling)
        self.adapters = build_adapters(
            self, student_shapes, teacher_shapes, lambda s, t: channel_adapter(s[:2], t[:2])
        )

    def forward(self, batch):
        pairs = embeddings(self, batch)
        adapters = [nn.Identity()] if self.uses_teacher_logits else getattr(self, "adapters", None)
        if adapters is None or len(adapters) != len(pairs):
            raise ValueError(
                "triplet: adapters not built for these layers; "
                "call setup(student_shapes, teacher_shapes) after choose_layers"
            )
        if len(batch.targets) != len(pairs[0][0]):
            raise ValueError(
                f"triplet: {len(batch.targets)} targets for {len(pairs[0][0])} samples; "
                "pass the batch's targets"
            )
        neg = sample_negatives(batch.targets, None, batch.ignore_index, self.cfg.background_class)
        keep = neg >= 0
        loss = 0.0
        for adapter, (s, t) in zip(adapters, pairs, strict=True):
            s = adapter(s)
            if s.shape != t.shape:
                raise ValueError(
                    f"triplet: student embedding {tuple(s.shape)} vs teacher {tuple(t.shape)}; with source "
                    "logits the student and teacher must predict the same classes, with features run setup "
                    "on the probed shapes"
                )
            pos = (t - s).pow(2).sum(1)
            far = (t - s[neg.clamp(min=0)]).pow(2).sum(1)
            hinge = (self.cfg.margin + pos - far).clamp(min=0)
            loss = loss + hinge[keep].sum() / keep.sum().clamp(min=1)
        return {"triplet": loss}
