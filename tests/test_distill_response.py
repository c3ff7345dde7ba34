"""``response`` (pixel-wise Hinton KD): our one normalisation, pinned.

    kd = T^2 * mean over the N*H*W pixels of sum over classes of p_t * (log p_t - log p_s),
    p  = softmax(z / T)

For classification logits (N, K) the mean runs over the N samples (mdistiller's form).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.distill import KD_METHODS
from tests.kd_helpers import batch, build_logit_method, rand


def build(**kw):
    return build_logit_method("response", **kw)


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


# --------------------------------------------------------------------------- standardize (Sun et al. 2024)


def zscore_loop(z):
    """Each pixel's logits minus their mean, over their unbiased std + 1e-7 (the paper's code)."""
    out = torch.empty_like(z)
    n, k, h, w = z.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                v = z[i, :, y, x]
                m = v.sum() / k
                sd = ((v - m) ** 2).sum().div(k - 1).sqrt()
                out[i, :, y, x] = (v - m) / (sd + 1e-7)
    return out


def test_standardize_formula_and_default_off():
    assert KD_METHODS.config_class("response")().standardize is False
    s, t = rand(2, 5, 3, 4, seed=1), rand(2, 5, 3, 4, seed=2) * 4
    out = build(standardize=True, temperature=2.0)(batch(s, t))["kd"]
    torch.testing.assert_close(out, kl_loop(zscore_loop(s), zscore_loop(t), 2.0))


def test_standardize_invariant_to_per_pixel_affine_student_logits():
    s, t = rand(2, 5, 3, 3, seed=1), rand(2, 5, 3, 3, seed=2)
    shift, scale = rand(2, 1, 3, 3, seed=3) * 5, rand(2, 1, 3, 3, seed=4).abs() * 3 + 0.2
    d = build(standardize=True)
    torch.testing.assert_close(
        d(batch(s * scale + shift, t))["kd"], d(batch(s, t))["kd"], atol=1e-5, rtol=1e-4
    )
    plain = build()
    assert not torch.allclose(plain(batch(s * scale + shift, t))["kd"], plain(batch(s, t))["kd"])


def test_standardize_zero_at_affine_copy_of_teacher_and_gradients():
    t = rand(2, 4, 3, 3, seed=2)
    s = (3 * t + 1).requires_grad_(True)
    d = build(standardize=True)
    torch.testing.assert_close(d(batch(s, t))["kd"], torch.tensor(0.0), atol=1e-6, rtol=0)
    s2, t2 = rand(2, 4, 3, 3, seed=1, grad=True), rand(2, 4, 3, 3, seed=2, grad=True)
    d(batch(s2, t2))["kd"].backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0 and t2.grad is None
