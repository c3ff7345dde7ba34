"""``afdcd`` (Fan et al., NeurIPS 2023): the masked-feature MSE and the omni-contrastive term written out with
loops, the token layout against the reference's own reshapes, pooling and cropping of small maps, ~0 where
the formula implies it, gradients, one-line errors, and the projector charged in kd_params and FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.data import load_data
from harness.distill import KD_METHODS, KDBatch
from harness.distill.afdcd import EnhancedProjector, omni_contrast, patch_layout, to_tokens
from harness.engine.compute import measure_step_cost
from harness.engine.run import build_distiller
from harness.engine.teacher import freeze, serve_teacher
from harness.models import build_model
from tests.kd_helpers import build_feature_method, feature_batch, rand
from tests.test_compute_budget import TEACHER, cfg_model, config

CPU = torch.device("cpu")


def reference_tokens(x, patch, groups):
    """OSVAI/Af-DCD's _to_ctr_format, transcribed: the layout our to_tokens must reproduce."""
    bs, c, h, w = x.shape
    x = x.contiguous().view(bs, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    x = torch.stack(x.split(c // groups, dim=3), dim=3)
    x = x.contiguous().view(bs, (h * w) // (patch * patch), groups, c // groups, patch * patch)
    return x.permute(0, 1, 4, 2, 3).contiguous().view(-1, patch * patch * groups, c // groups)


def contrast_by_loops(g, t, tau, groups, patch):
    """For every student token (position i, group k) of every patch: CE of the teacher's (i, k) against the
    teacher's tokens of the other groups; similarity -L1 / tau. Returns groups * mean CE."""
    n, c, h, w = t.shape
    width = c // groups
    ces = []
    for b in range(n):
        for py in range(0, h, patch):
            for px in range(0, w, patch):
                cells = [(py + i // patch, px + i % patch) for i in range(patch * patch)]

                def token(x, cell, k, b=b):
                    return x[b, k * width : (k + 1) * width, cell[0], cell[1]]

                for cell in cells:
                    for k in range(groups):
                        anchor = token(g, cell, k)
                        logits = [-(anchor - token(t, cell, k)).abs().sum() / tau]
                        logits += [
                            -(anchor - token(t, other, k2)).abs().sum() / tau
                            for other in cells
                            for k2 in range(groups)
                            if k2 != k
                        ]
                        ces.append(-torch.stack(logits).log_softmax(0)[0])
    return groups * torch.stack(ces).mean()


def test_tokens_match_the_reference_layout():
    x = rand(2, 8, 4, 6, seed=1)
    torch.testing.assert_close(to_tokens(x, 2, 4), reference_tokens(x, 2, 4))


def test_formula_written_out():
    s, t = rand(2, 3, 2, 2, seed=2), rand(2, 4, 4, 4, seed=3)
    d = build_feature_method("afdcd", s.shape, t.shape, channel_groups=2, patch_size=2, tau=0.5)
    torch.manual_seed(7)
    out = d(feature_batch(s, t))
    torch.manual_seed(7)
    zeroed = torch.rand(2, 1, 4, 4) > 1 - 0.75  # the reference's draw: one per image and position
    align, (g1, _, g2) = d.aligners[0], d.generators[0]
    a = torch.einsum("oc,nchw->nohw", align.weight[:, :, 0, 0], s) + align.bias[None, :, None, None]
    a = F.interpolate(a, size=(4, 4), mode="bilinear", align_corners=False)
    a = torch.where(zeroed, torch.zeros_like(a), a)
    g = F.conv2d(F.conv2d(a, g1.weight, g1.bias, padding=1).relu(), g2.weight, g2.bias, padding=1)
    torch.testing.assert_close(out["fd"], ((g - t) ** 2).mean())
    ctr = contrast_by_loops(g, t, 0.5, 2, 2)
    torch.testing.assert_close(out["ctr"], 0.005 * ctr)
    # the reference's normalisation: CE summed over anchors / (N * H * W)
    anchors = 2 * 16 * 2
    torch.testing.assert_close(ctr, (ctr / 2 * anchors) / (2 * 16))


def test_pooling_and_cropping_of_small_maps():
    assert patch_layout(64, 128, 4, 4) == (4, 4)  # the reference's Cityscapes map: pooled, 4 x 4 patches
    assert patch_layout(4, 4, 4, 4) == (1, 4)  # too small to pool: one 4 x 4 patch
    assert patch_layout(2, 2, 4, 4) == (1, 2)  # digits_seg's teacher bottleneck: one 2 x 2 patch
    g, t = rand(1, 4, 16, 16, seed=4), rand(1, 4, 16, 16, seed=5)
    torch.testing.assert_close(
        omni_contrast(g, t, 0.1, 2, 2, 4),
        contrast_by_loops(F.max_pool2d(g, 2), F.max_pool2d(t, 2), 0.1, 2, 4),
    )
    g, t = rand(1, 4, 5, 5, seed=6), rand(1, 4, 5, 5, seed=7)  # 5 x 5 with 2 x 2 patches: last row/column cut
    torch.testing.assert_close(
        omni_contrast(g, t, 0.1, 2, 1, 2), contrast_by_loops(g[..., :4, :4], t[..., :4, :4], 0.1, 2, 2)
    )


def identity_generator(gen: nn.Sequential, channels: int):
    eye = torch.zeros(channels, channels, 3, 3)
    eye[range(channels), range(channels), 1, 1] = 1
    with torch.no_grad():
        for conv in (gen[0], gen[2]):
            conv.weight.copy_(eye)
            conv.bias.zero_()


def test_near_zero_when_the_projection_is_the_teacher():
    # 2 groups of 2 channels, far apart (group 1 is offset by 20): every negative is much further than the
    # positive, so the contrastive CE is ~0; with no mask and identity A and G the MSE is exactly 0
    t = rand(2, 4, 4, 4, seed=8).abs()
    t[:, 2:] += 20
    d = build_feature_method("afdcd", t.shape, t.shape, channel_groups=2, patch_size=2, mask_ratio=0.0)
    identity_generator(d.generators[0], 4)
    out = d(feature_batch(t.clone(), t))
    assert out["fd"].item() == 0.0
    assert out["ctr"].item() < 1e-6
    assert d(feature_batch(t + rand(2, 4, 4, 4, seed=9), t))["fd"] > 0.1


def test_gradients_reach_student_and_projector_not_teacher():
    s, t = rand(2, 3, 4, 4, seed=10, grad=True), rand(2, 4, 4, 4, seed=11, grad=True)
    d = build_feature_method("afdcd", s.shape, t.shape, channel_groups=2, mask_ratio=0.5)
    sum(d(feature_batch(s, t)).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None for p in d.parameters())


def test_defaults_kd_params_and_enhanced_projector():
    cfg = KD_METHODS.config_class("afdcd")()
    assert (cfg.tau, cfg.fd_weight, cfg.ctr_weight, cfg.mask_ratio) == (0.07, 1.0, 0.005, 0.75)
    assert (cfg.channel_groups, cfg.pool_size, cfg.patch_size, cfg.projector) == (16, 4, 4, "basic")
    d = build_feature_method("afdcd", (2, 3, 4, 4), (2, 16, 4, 4))
    generator = 2 * (16 * 16 * 9 + 16)
    assert d.extra_parameters() == 3 * 16 + 16 + generator
    assert d.student_layers == ["s"]
    enhanced = build_feature_method("afdcd", (2, 16, 4, 4), (2, 16, 4, 4), projector="enhanced")
    assert isinstance(enhanced.generators[0], EnhancedProjector)
    assert isinstance(enhanced.aligners[0], nn.Identity)  # channels already match
    assert enhanced.extra_parameters() == 2 * generator
    with pytest.raises(ValueError):
        KD_METHODS.config_class("afdcd")(channel_groups=1)  # no negatives


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="not a multiple of kd.channel_groups 16") as exc:
        build_feature_method("afdcd", (2, 3, 4, 4), (2, 24, 4, 4))
    assert "\n" not in str(exc.value)
    d = build_feature_method("afdcd", (2, 3, 4, 4), (2, 16, 4, 4))
    for batch, message in [
        (KDBatch(torch.zeros(2, 3), torch.arange(2), None, {}, {"t": rand(2, 16, 4, 4)}), "no student"),
        (feature_batch(rand(2, 3), rand(2, 16)), "feature maps"),
    ]:
        with pytest.raises(ValueError, match=message) as exc:
            d(batch)
        assert "\n" not in str(exc.value)


def test_default_taps_are_the_backbones_last_stage_and_projector_flops_are_charged():
    cfg = config(epochs=1, kd={"method": "afdcd"}, teacher="not_loaded.yaml")
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    teacher = freeze(build_model(cfg_model(TEACHER), data.in_channels, data.num_classes))
    d = build_distiller(cfg, model, teacher, data, CPU)
    assert d.student_layers == ["bottleneck"] and d.teacher_layers == ["bottleneck"]
    no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    server, _ = serve_teacher(teacher, d.teacher_layers, data, cfg.train, CPU, no_amp, ("afdcd",))
    cost = measure_step_cost(model, d, server, teacher, data, cfg.train.batch_size, CPU)
    # A and G (forward, and backward for inputs and weights: 3 x forward) at the teacher's 4 x 4 bottleneck,
    # per image: 2 x multiply-adds of each convolution, from the layer shapes
    convs = [m for m in (*d.aligners.modules(), *d.generators.modules()) if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3)]
    forward = sum(2 * c.weight.numel() * 4 * 4 for c in convs)
    assert cost.kd >= 3 * forward > 0
