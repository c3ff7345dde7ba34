"""The best single intensity threshold: the trivial predictor a binary one-channel segmentation must beat.

A pixel is called foreground when its own input value lies above (or, if that scores better, below) one
threshold, chosen on the training split to maximise the training pixels' mIoU (ignored pixels left out) and
then applied unchanged to the test split. Candidates are the edges of a 1024-bin histogram of the training
values, so the choice is exact up to 1/1024 of the value range.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.data.loader import iterate_batches

BINS = 1024


class ThresholdPrediction(nn.Module):
    """Foreground where ``sign * x > sign * threshold`` (channel 0), as two-class logits."""

    def __init__(self, threshold: float, above: bool):
        super().__init__()
        self.threshold, self.above = threshold, above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0]
        fg = v > self.threshold if self.above else v <= self.threshold
        return torch.stack([(~fg).float(), fg.float()], dim=1)


def _pairs(split, ignore_index: int, device):
    if hasattr(split, "images"):
        yield split.images[:, 0], split.targets
        return
    for x, y, _ in iterate_batches(split, 64, device=device, shuffle=False):
        yield x[:, 0], y


def _two_class_miou(tp, fp, fn, tn) -> torch.Tensor:
    return (tp / (tp + fp + fn).clamp(min=1) + tn / (tn + fn + fp).clamp(min=1)) / 2


def fit_threshold(split, ignore_index: int, device) -> tuple[float, bool, float]:
    """(threshold, above, training mIoU) of the best single threshold on ``split``'s labelled pixels."""
    values, labels = [], []
    for v, y in _pairs(split, ignore_index, device):
        keep = y != ignore_index
        values.append(v[keep].float().cpu())
        labels.append(y[keep].cpu())
    v, y = torch.cat(values), torch.cat(labels)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo, True, 0.0
    fg_hist = torch.histc(v[y == 1], BINS, lo, hi).double()
    bg_hist = torch.histc(v[y != 1], BINS, lo, hi).double()
    # pixels at or below edge i: cumulative counts; "above" calls the rest foreground
    fg_below, bg_below = fg_hist.cumsum(0), bg_hist.cumsum(0)
    fg_all, bg_all = fg_below[-1], bg_below[-1]
    above = _two_class_miou(fg_all - fg_below, bg_all - bg_below, fg_below, bg_below)
    below = _two_class_miou(fg_below, bg_below, fg_all - fg_below, bg_all - bg_below)
    edges = torch.linspace(lo, hi, BINS + 1)[1:]
    best_above, best_below = int(above.argmax()), int(below.argmax())
    if above[best_above] >= below[best_below]:
        return float(edges[best_above]), True, float(above[best_above])
    return float(edges[best_below]), False, float(below[best_below])
