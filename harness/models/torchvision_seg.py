"""Teachers from torchvision.models.segmentation, built untrained (no downloads: weights=None,
weights_backbone=None) with no auxiliary head. ``model.weights: DEFAULT`` (or another torchvision weights
name) loads torchvision's pretrained weights from the torch hub cache (harness/models/weights.py).

The torchvision model is kept whole as ``net``; the wrapper's forward returns ``net(x)["out"]``, logits
(N, classes, H, W) at the input's size, so the trainer sees a plain tensor like from every other model.
When ``in_channels`` is not 3, the backbone's first convolution is replaced by a freshly initialised one
with the right number of input channels (same output channels, kernel, stride and padding).

``kd_layers``: ResNet-50 models tap ``net.backbone.layer1`` .. ``layer4`` (256, 512, 1024, 2048 channels at
strides 4, 8, 8, 8: the last two stages are dilated); MobileNetV3-Large taps the last block of each stage
at strides 4, 8, 16 and the final 960-channel conv (``net.backbone.3``, ``.6``, ``.12``, ``.16``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from harness.models.base import MODELS, ModelConfigBase


class TorchvisionSegmentation(nn.Module):
    def __init__(
        self, net: nn.Module, first_conv: str, kd_layers: list[str], in_channels: int, name: str = ""
    ):
        super().__init__()
        self.net = net
        self.torchvision_name = (
            name  # model.weights may name its torchvision weights (harness/models/weights.py)
        )
        self.first_conv = first_conv
        if in_channels != 3:
            replace_conv_inputs(self, first_conv, in_channels)
        self.kd_layers = list(kd_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def replace_conv_inputs(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the Conv2d called ``name`` for a new one reading ``in_channels`` channels."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{name} is a {type(old).__name__}, not a Conv2d")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=1,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's backbones do
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


RESNET_LAYERS = [f"net.backbone.layer{i}" for i in range(1, 5)]
MOBILENET_LAYERS = [f"net.backbone.{i}" for i in (3, 6, 12, 16)]


class DeepLabV3ResNet50Config(ModelConfigBase):
    name: Literal["deeplabv3_resnet50"] = "deeplabv3_resnet50"


class FCNResNet50Config(ModelConfigBase):
    name: Literal["fcn_resnet50"] = "fcn_resnet50"


class DeepLabV3MobileNetV3LargeConfig(ModelConfigBase):
    name: Literal["deeplabv3_mobilenet_v3_large"] = "deeplabv3_mobilenet_v3_large"


def _torchvision(name: str, num_classes: int) -> nn.Module:
    from torchvision.models import segmentation

    return getattr(segmentation, name)(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
    )


@MODELS.register(DeepLabV3ResNet50Config)
def build_deeplabv3_resnet50(cfg, in_channels: int, num_classes: int) -> TorchvisionSegmentation:
    net = _torchvision("deeplabv3_resnet50", num_classes)
    return TorchvisionSegmentation(
        net, "net.backbone.conv1", RESNET_LAYERS, in_channels, "deeplabv3_resnet50"
    )


@MODELS.register(FCNResNet50Config)
def build_fcn_resnet50(cfg, in_channels: int, num_classes: int) -> TorchvisionSegmentation:
    net = _torchvision("fcn_resnet50", num_classes)
    return TorchvisionSegmentation(net, "net.backbone.conv1", RESNET_LAYERS, in_channels, "fcn_resnet50")


@MODELS.register(DeepLabV3MobileNetV3LargeConfig)
def build_deeplabv3_mobilenet_v3_large(cfg, in_channels: int, num_classes: int) -> TorchvisionSegmentation:
    net = _torchvision("deeplabv3_mobilenet_v3_large", num_classes)
    return TorchvisionSegmentation(
        net, "net.backbone.0.0", MOBILENET_LAYERS, in_channels, "deeplabv3_mobilenet_v3_large"
    )
