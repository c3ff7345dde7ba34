"""k-UNet (seed 002): a U-Net whose first stage has k channels, doubling at each level (k, 2k, 4k, 8k, 16k).

Each stage is two 3x3 convolutions with bias, each followed by batch norm (optional) and ReLU; 2x2 max-pool
down, 2x2 transposed convolution up, skip concatenation, and a 1x1 head. With 1 input channel and 2 classes
this has 31,042,434 parameters at k=64 and 30,902 at k=2, the counts seed 002 reports.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from harness.models.base import MODELS, ModelConfigBase


class UNetConfig(ModelConfigBase):
    name: Literal["unet"] = "unet"
    width: int = Field(16, ge=1, description="k: channels of the first stage")
    depth: int = Field(5, ge=2, le=7, description="number of stages, counting the bottleneck")
    batch_norm: bool = True


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for c_in in (cin, cout):
            layers.append(nn.Conv2d(c_in, cout, 3, padding=1, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, width: int = 16, depth: int = 5, batch_norm: bool = True
    ):
        super().__init__()
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans[:-1]:
            self.down.append(DoubleConv(cin, c, batch_norm))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(chans[-2], chans[-1], batch_norm)
        self.up = nn.ModuleList()
        self.upconv = nn.ModuleList()
        for c_low, c in zip(reversed(chans[1:]), reversed(chans[:-1])):
            self.upconv.append(nn.ConvTranspose2d(c_low, c, 2, stride=2))
            self.up.append(DoubleConv(2 * c, c, batch_norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        n_up = depth - 1
        self.kd_layers = (
            [f"down.{i}" for i in range(depth - 1)] + ["bottleneck"] + [f"up.{i}" for i in range(n_up)]
        )
        self.min_size = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.min_size or x.shape[-2] % self.min_size:
            raise ValueError(
                f"UNet of depth {len(self.down) + 1} needs H and W divisible by {self.min_size}, got "
                f"{tuple(x.shape[-2:])}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
            x = block(torch.cat([skip, upconv(x)], dim=1))
        return self.head(x)


@MODELS.register(UNetConfig)
def build_unet(cfg: UNetConfig, in_channels: int, num_classes: int) -> UNet:
    return UNet(in_channels, num_classes, cfg.width, cfg.depth, cfg.batch_norm)
