"""``mgd`` (Yang et al. 2022): the masked-generation loss written out with explicit convolutions, the mask
(rate, fresh per image and per call, shared by the channels), the generator's minimum, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.distill import KD_METHODS, KDBatch
from tests.kd_helpers import build_feature_method, feature_batch, rand


def test_formula_with_aligner_resize_and_mask():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 6, 8, 8, seed=2)
    d = build_feature_method("mgd", s.shape, t.shape)
    torch.manual_seed(5)
    out = d(feature_batch(s, t))["mgd"]
    torch.manual_seed(5)
    zeroed = torch.rand(2, 1, 8, 8) > 1 - 0.75  # the paper's draw: one per image and position
    align, (g1, _, g2) = d.aligners[0], d.generators[0]
    a = torch.einsum("oc,nchw->nohw", align.weight[:, :, 0, 0], s) + align.bias[None, :, None, None]
    a = F.interpolate(a, size=(8, 8), mode="bilinear", align_corners=False)
    a = torch.where(zeroed, torch.zeros_like(a), a)
    new = F.conv2d(F.conv2d(a, g1.weight, g1.bias, padding=1).relu(), g2.weight, g2.bias, padding=1)
    torch.testing.assert_close(out, ((new - t) ** 2).mean())
    # the paper's normalisation (sum / N) is ours times C*H*W: the rescaling of alpha in the docs
    torch.testing.assert_close(out * 6 * 8 * 8, ((new - t) ** 2).sum() / 2)


def test_defaults_and_extra_parameters():
    cfg = KD_METHODS.config_class("mgd")()
    assert (cfg.beta, cfg.mask_ratio, cfg.num_layers) == (1.0, 0.75, 1)
    same = build_feature_method("mgd", (2, 4, 8, 8), (2, 4, 8, 8))
    assert isinstance(same.aligners[0], nn.Identity)  # the paper aligns only when channels differ
    generator = 2 * (4 * 4 * 9 + 4)
    assert same.extra_parameters() == generator
    assert build_feature_method("mgd", (2, 3, 8, 8), (2, 4, 8, 8)).extra_parameters() == generator + 3 * 4 + 4
    with pytest.raises(ValueError):
        KD_METHODS.config_class("mgd")(mask_ratio=1.0)


def generator_inputs(d, s, t, calls=1):
    seen = []
    hook = d.generators[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    for _ in range(calls):
        d(feature_batch(s, t))
    hook.remove()
    return seen


def test_mask_rate_fresh_per_image_and_call_shared_by_channels():
    s = torch.ones(8, 3, 32, 32)  # equal channels: identity aligner, so the generator sees the mask itself
    d = build_feature_method("mgd", s.shape, s.shape)
    first, second = generator_inputs(d, s, s, calls=2)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert (first == first[:, :1]).all()  # one mask per position, shared by the channels
    zeroed = (first[:, 0] == 0).float()
    assert abs(zeroed.mean().item() - 0.75) < 0.02  # 8192 draws: std of the rate ~0.005
    assert all(abs(r - 0.75) < 0.08 for r in zeroed.mean(dim=(1, 2)).tolist())
    assert not torch.equal(first[0], first[1]), "the same mask for two images"
    assert not torch.equal(first, second), "the same mask at two steps"
    (none,) = generator_inputs(build_feature_method("mgd", s.shape, s.shape, mask_ratio=0.0), s, s)
    assert (none == 1).all()


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_training_the_generator_alone_lowers_the_loss(ratio):
    """Its minimum: with no mask and s == t the generator can learn the identity, so the loss goes to ~0;
    with the paper's mask it learns to fill in the zeroed positions and the loss still falls."""
    torch.manual_seed(0)
    x = F.avg_pool2d(
        rand(4, 3, 12, 12, seed=1), 3, stride=1, padding=1
    )  # smooth, so masked spots are guessable
    d = build_feature_method("mgd", x.shape, x.shape, mask_ratio=ratio)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = d(feature_batch(x, x))["mgd"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = losses[0], sum(losses[-20:]) / 20
    assert end < (0.05 if ratio == 0 else 0.7) * start, (start, end)


def test_gradients_reach_student_aligner_and_generator_not_teacher():
    s, t = rand(4, 3, 8, 8, seed=1, grad=True), rand(4, 6, 8, 8, seed=2, grad=True)
    d = build_feature_method("mgd", s.shape, t.shape)
    d(feature_batch(s, t))["mgd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"mgd: needs feature maps \(N, C, H, W\)"):
        build_feature_method("mgd", (2, 3), (2, 5))
    with pytest.raises(ValueError, match="mgd: no probed shape for teacher layer 't'"):
        build_feature_method("mgd").setup({"s": torch.Size((2, 3, 4, 4))}, {})
    with pytest.raises(ValueError, match="mgd: adapters not built.*call setup"):
        build_feature_method("mgd")(feature_batch(rand(2, 3, 4, 4), rand(2, 3, 4, 4)))
    d = build_feature_method("mgd", (2, 3, 4, 4), (2, 5, 4, 4))
    with pytest.raises(ValueError, match="mgd: the batch has no teacher feature 't'"):
        d(KDBatch(torch.zeros(2, 3), torch.arange(2), None, {"s": rand(2, 3, 4, 4)}, {}))
    with pytest.raises(ValueError, match="mgd: student feature .* do not pair up"):
        d(feature_batch(rand(2, 3, 4, 4), rand(3, 5, 4, 4)))
    with pytest.raises(
        ValueError, match=r"mgd: aligned student feature \(2, 5, 4, 4\) does not match.*setup"
    ):
        d(feature_batch(rand(2, 3, 4, 4), rand(2, 6, 4, 4)))


def test_default_taps_are_the_backbones_last_stage_not_the_decoders():
    """The paper's segmentation code distils the backbone's last stage: the k-UNet's bottleneck."""
    from harness.models.dilated_br import DilatedBR
    from harness.models.unet import UNet

    def chosen(student, teacher, **kw):
        d = KD_METHODS.build(KD_METHODS.config_class("mgd")(**kw))
        d.choose_layers(student.kd_layers, teacher.kd_layers)
        return d.student_layers, d.teacher_layers

    s, t = UNet(1, 3, width=2, depth=3), UNet(1, 3, width=4, depth=3)
    assert chosen(s, t) == (["bottleneck"], ["bottleneck"])
    assert chosen(s, t, num_layers=2) == (["down.1", "bottleneck"], ["down.1", "bottleneck"])
    assert chosen(s, t, student_layers=["up.1"], teacher_layers=["up.1"]) == (["up.1"], ["up.1"])
    assert chosen(DilatedBR(1, 3), t) == (["enc.3"], ["bottleneck"])
    assert chosen(s, t, num_layers=9)[0] == ["down.0", "down.1", "bottleneck"]
    # a model whose taps are all decoder stages keeps them
    d = KD_METHODS.build(KD_METHODS.config_class("mgd")())
    d.choose_layers(["up.0", "up.1"], ["up.0", "up.1"])
    assert d.student_layers == ["up.1"]
