"""``response`` (pixel-wise Hinton KD): our one normalisation, pinned.

    kd = T^2 * mean over the N*H*W pixels of sum over classes of p_t * (log p_t - log p_s),  p = softmax(z / T)

For classification logits (N, K) the mean runs over the N samples (mdistiller's form).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.distill import KD_METHODS, KDBatch


def build(**kw):
    d = KD_METHODS.build(KD_METHODS.config_class("response")(**kw))
    d.choose_layers(["a"], ["b"])
    d.setup({}, {})
    return d


def rand(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def batch(s, t):
    return KDBatch(student_logits=s, targets=torch.zeros(len(s), dtype=torch.long), teacher_logits=t)


def kl_loop(s, t, T):
    """Per-pixel KL written out, averaged over pixels (segmentation) or samples (classification)."""
    if s.dim() == 2:
        s, t = s[:, :, None, None], t[:, :, None, None]
    n, k, h, w = s.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p_t = torch.softmax(t[i, :, y, x] / T, 0)
                p_s = torch.softmax(s[i, :, y, x] / T, 0)
                total += sum(p_t[c] * (p_t[c].log() - p_s[c].log()) for c in range(k))
    return T**2 * total / (n * h * w)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_segmentation_formula_per_pixel_mean_times_t2(T):
    s, t = rand(2, 5, 3, 4, seed=1), rand(2, 5, 3, 4, seed=2)
    d = build(temperature=T)
    assert d.uses_teacher_logits and d.student_layers == [] and d.extra_parameters() == 0
    torch.testing.assert_close(d(batch(s, t))["kd"], kl_loop(s, t, T))


def test_classification_formula_batch_mean():
    s, t = rand(6, 10, seed=1), rand(6, 10, seed=2)
    d = build()
    assert d.cfg.temperature == 4.0
    torch.testing.assert_close(d(batch(s, t))["kd"], kl_loop(s, t, 4.0))
    # equals mdistiller's KD loss: KL summed over classes, mean over the batch, times T^2
    ref = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    torch.testing.assert_close(d(batch(s, t))["kd"], ref)


def test_normalisation_does_not_grow_with_image_size():
    """Per-pixel mean: tiling the image 2x2 leaves the loss unchanged (a per-image sum would grow 4x)."""
    s, t = rand(2, 4, 3, 3, seed=1), rand(2, 4, 3, 3, seed=2)
    d = build(temperature=2.0)
    small = d(batch(s, t))["kd"]
    big = d(batch(s.repeat(1, 1, 2, 2), t.repeat(1, 1, 2, 2)))["kd"]
    torch.testing.assert_close(small, big)


def test_zero_when_student_equals_teacher():
    t = rand(3, 5, 4, 4)
    out = build()(batch(t.clone(), t))["kd"]
    torch.testing.assert_close(out, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_student_logits_resized_to_teacher():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 8, 8, seed=2)
    d = build(temperature=2.0)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(d(batch(s, t))["kd"], kl_loop(up, t, 2.0))


def test_gradients_reach_the_student_only():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 3, 4, 4, seed=2)
    build()(batch(s, t.detach()))["kd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_never_builds_a_graph_into_the_teacher():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 3, 4, 4, seed=2, grad=True)
    build()(batch(s, t))["kd"].backward()
    assert t.grad is None


def test_class_count_mismatch_names_the_fix():
    with pytest.raises(
        ValueError, match="response: student predicts 3 classes but the teacher 4.*same dataset"
    ):
        build()(batch(rand(2, 3, 4, 4), rand(2, 4, 4, 4)))


def test_temperature_must_be_positive():
    with pytest.raises(ValueError):
        KD_METHODS.config_class("response")(temperature=0)
