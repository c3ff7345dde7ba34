"""``dist`` (Huang et al. 2022): the inter- and intra-class Pearson terms written out with loops, their
minimum at student == teacher, where gradients go, errors, and the standardize option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.distill import KD_METHODS
from tests.kd_helpers import batch, build_logit_method, rand


def build(**kw):
    return build_logit_method("dist", **kw)


def pearson(x, y):
    """Pearson correlation of two 1-d tensors, term by term (eps 1e-8 as in the paper's code)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sx = sum((a - mx) ** 2 for a in x).sqrt()
    sy = sum((b - my) ** 2 for b in y).sqrt()
    return cov / (sx * sy + 1e-8)


def dist_loop(s, t, tau):
    """(inter, intra) from per-pixel probability vectors listed one by one."""
    if s.dim() == 2:
        s, t = s[:, :, None, None], t[:, :, None, None]
    n, k, h, w = s.shape
    rows_s, rows_t = [], []
    for i in range(n):
        for y in range(h):
            for x in range(w):
                rows_s.append(torch.softmax(s[i, :, y, x] / tau, 0))
                rows_t.append(torch.softmax(t[i, :, y, x] / tau, 0))
    inter = 1 - sum(pearson(a, b) for a, b in zip(rows_s, rows_t, strict=True)) / len(rows_s)
    cols = [(torch.stack([r[c] for r in rows_s]), torch.stack([r[c] for r in rows_t])) for c in range(k)]
    intra = 1 - sum(pearson(a, b) for a, b in cols) / k
    return tau**2 * inter, tau**2 * intra


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_segmentation_formula(tau):
    s, t = rand(2, 5, 3, 4, seed=1), rand(2, 5, 3, 4, seed=2) * 3
    d = build(tau=tau)
    assert d.uses_teacher_logits and d.student_layers == [] and d.extra_parameters() == 0
    out = d(batch(s, t))
    inter, intra = dist_loop(s, t, tau)
    torch.testing.assert_close(out["inter"], inter)
    torch.testing.assert_close(out["intra"], intra)


def test_defaults_weights_and_classification():
    cfg = KD_METHODS.config_class("dist")()
    assert (cfg.tau, cfg.inter_weight, cfg.intra_weight, cfg.beta, cfg.standardize) == (1, 1, 1, 1, False)
    s, t = rand(6, 10, seed=1), rand(6, 10, seed=2)
    out = build(inter_weight=2.0, intra_weight=0.5)(batch(s, t))
    inter, intra = dist_loop(s, t, 1.0)
    torch.testing.assert_close(out["inter"], 2 * inter)
    torch.testing.assert_close(out["intra"], 0.5 * intra)


def test_student_logits_resized_to_teacher():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 8, 8, seed=2)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    out = build(tau=2.0)(batch(s, t))
    torch.testing.assert_close((out["inter"], out["intra"]), dist_loop(up, t, 2.0))


def test_zero_when_student_equals_teacher_and_scale_free():
    t = rand(3, 5, 4, 4)
    d = build()
    for value in d(batch(t.clone(), t)).values():
        torch.testing.assert_close(value, torch.tensor(0.0), atol=1e-6, rtol=0)
    # Pearson ignores a shift of each pixel's probabilities: a sharper but same-ranked student is not zero,
    # yet its loss is far below a random student's
    sharper, other = d(batch(2 * t, t)), d(batch(rand(3, 5, 4, 4, seed=9), t))
    assert sum(sharper.values()) < 0.2 * sum(other.values())


def test_gradients_reach_the_student_only():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 3, 4, 4, seed=2, grad=True)
    sum(build()(batch(s, t)).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_errors_name_the_fix():
    d = build()
    with pytest.raises(ValueError, match="dist: student predicts 3 classes but the teacher 4.*same dataset"):
        d(batch(rand(2, 3, 4, 4), rand(2, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"dist: needs logits \(N, K, H, W\) or \(N, K\)"):
        d(batch(rand(2, 3, 4), rand(2, 3, 4)))
    with pytest.raises(ValueError, match="dist: 2 student images but 3 teacher images"):
        d(batch(rand(2, 3, 4, 4), rand(3, 3, 4, 4)))
    with pytest.raises(ValueError):
        KD_METHODS.config_class("dist")(tau=0)


def test_standardize_is_invariant_to_per_pixel_affine_student_logits():
    s, t = rand(2, 5, 3, 3, seed=1), rand(2, 5, 3, 3, seed=2)
    shift, scale = rand(2, 1, 3, 3, seed=3) * 5, rand(2, 1, 3, 3, seed=4).abs() * 3 + 0.2
    d, plain = build(standardize=True, tau=2.0), build(tau=2.0)
    a, b = d(batch(s, t)), d(batch(s * scale + shift, t))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain(batch(s, t))["inter"], plain(batch(s * scale + shift, t))["inter"])
    # and equals the plain loss on logits z-scored here by hand
    z = lambda x: (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-7)  # noqa: E731
    torch.testing.assert_close(a, plain(batch(z(s), z(t))))
