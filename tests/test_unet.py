import pytest
import torch

from harness.models import build_model, count_parameters
from harness.models.unet import UNet, UNetConfig


@pytest.mark.parametrize(("width", "expected"), [(64, 31_042_434), (2, 30_902)])
def test_parameter_counts_match_seed_002(width, expected):
    assert count_parameters(UNet(in_channels=1, num_classes=2, width=width)) == expected


def test_forward_shape_and_kd_layers():
    model = build_model(UNetConfig(width=2, depth=3), in_channels=1, num_classes=11)
    out = model(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, 11, 16, 16)
    names = dict(model.named_modules())
    assert all(layer in names for layer in model.kd_layers)
    assert model.kd_layers == ["down.0", "down.1", "bottleneck", "up.0", "up.1"]


def test_batch_norm_off_removes_bn_layers():
    with_bn = UNet(1, 2, width=2, batch_norm=True)
    without = UNet(1, 2, width=2, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    # two BN layers (weight + bias per channel) in each of 9 blocks: channels k..16k down, 8k..k up
    assert count_parameters(with_bn) - count_parameters(without) == 2 * 2 * 2 * (2 * (1 + 2 + 4 + 8) + 16)


def test_input_size_must_fit_depth():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(1, 2, width=2, depth=5)(torch.zeros(1, 1, 20, 20))
