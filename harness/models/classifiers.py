"""Classifiers of seed 003: the MNIST / Fashion-MNIST MLPs and the CIFAR-10 CNN teacher and student.

* ``mlp``: fully connected layers ``fc1 .. fcN`` with ReLU (and optional dropout) between them. The input
  is flattened to C*H*W; ``input_size`` (the image side) fixes fc1's width. ``hidden: [1200, 1200]`` on
  1x28x28 is seed 003's teacher 784-1200-1200-10 (2,395,210 parameters); ``hidden: [400]`` its student
  784-400-10 (318,010).
* ``cifar_cnn_teacher`` / ``cifar_cnn_student``: the layers seed 003 prints, with the same names.

Seed 003 prints only the layer lists, not the forward pass. Our reading, the one consistent with the
printed fc1 widths (three 2x2 pools take 32x32 to 4x4):

  teacher: [conv1-bn1-relu, conv2-bn2-relu, pool] [conv3-bn3-relu, conv4-bn4-relu, pool]
           [conv5-bn5-relu, pool] flatten (128*4*4 = 2048) dropout fc1(512)-relu dropout fc2(128)-relu
           dropout fc3(10)
  student: [conv1-relu, pool] [conv2-relu, pool] [conv3-relu, pool] flatten (64*4*4 = 1024) dropout
           fc1(128)-relu dropout fc2(10)

Dropout (p=0.5, the one printed module) is applied before every fully connected layer. fc1's input width
is computed from ``input_size``: 32 gives the printed 2048 / 1024; 28 (Fashion-MNIST) gives 3x3 maps after
the three pools (128*9 = 1152 / 64*9 = 576); 8 (sklearn digits) gives 1x1. A model rejects inputs of any
other size with a message naming ``model.input_size``.

``kd_layers`` (for feature KD) name modules that run once per forward pass, so a hook sees one tensor:
the MLP's hidden linear layers (pre-activation), the CNNs' last normalised / convolved map of each stage
(pre-activation) and the penultimate fully connected layer (the embedding before the classifier).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from harness.models.base import MODELS, ModelConfigBase


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(x.shape[1:]) != expected:
        got = "x".join(str(d) for d in x.shape[1:])
        raise ValueError(
            f"{model.kind} was built for {'x'.join(map(str, expected))} inputs (C x H x W) but got {got}; "
            "set model.input_size to the images' side (and train on the data it was built for)"
        )


class MLPConfig(ModelConfigBase):
    name: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(
        [1200, 1200], min_length=1, description="hidden widths; [1200, 1200] teacher, [400] student"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each hidden ReLU")
    input_size: int = Field(28, ge=1, description="image side in pixels; fc1 takes C*input_size^2 inputs")


class MLP(nn.Module):
    kind = "mlp"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        input_size: int = 28,
    ):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size
        widths = [in_channels * input_size * input_size, *hidden, num_classes]
        self.n_layers = len(widths) - 1
        for i in range(self.n_layers):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.kd_layers = [f"fc{i + 1}" for i in range(len(hidden))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        x = x.flatten(1)
        for i in range(1, self.n_layers):
            x = self.dropout(self.relu(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.n_layers}")(x)


@MODELS.register(MLPConfig)
def build_mlp(cfg: MLPConfig, in_channels: int, num_classes: int) -> MLP:
    return MLP(in_channels, num_classes, cfg.hidden, cfg.dropout, cfg.input_size)


def _pooled_side(size: int, pools: int = 3) -> int:
    for _ in range(pools):
        size //= 2
    if size < 1:
        raise ValueError(f"input_size must be at least {2**pools} for {pools} 2x2 max-pools")
    return size


class CifarCNNTeacherConfig(ModelConfigBase):
    name: Literal["cifar_cnn_teacher"] = "cifar_cnn_teacher"
    dropout: float = Field(0.5, ge=0, lt=1)
    input_size: int = Field(
        32, ge=8, description="image side in pixels; 32 gives the printed fc1 of 2048 inputs"
    )


class CifarCNNTeacher(nn.Module):
    """Seed 003's ``Net_teacher``; see the module docstring for the forward order."""

    kind = "cifar_cnn_teacher"

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5, input_size: int = 32
    ):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size
        side = _pooled_side(input_size)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv5 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * side * side, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.batchnorm1 = nn.BatchNorm2d(32)
        self.batchnorm2 = nn.BatchNorm2d(32)
        self.batchnorm3 = nn.BatchNorm2d(64)
        self.batchnorm4 = nn.BatchNorm2d(64)
        self.batchnorm5 = nn.BatchNorm2d(128)
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        self.kd_layers = ["batchnorm2", "batchnorm4", "batchnorm5", "fc2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        x = self.relu(self.batchnorm1(self.conv1(x)))
        x = self.pool(self.relu(self.batchnorm2(self.conv2(x))))
        x = self.relu(self.batchnorm3(self.conv3(x)))
        x = self.pool(self.relu(self.batchnorm4(self.conv4(x))))
        x = self.pool(self.relu(self.batchnorm5(self.conv5(x))))
        x = self.dropout(x.flatten(1))
        x = self.dropout(self.relu(self.fc1(x)))
        x = self.dropout(self.relu(self.fc2(x)))
        return self.fc3(x)


@MODELS.register(CifarCNNTeacherConfig)
def build_cifar_cnn_teacher(
    cfg: CifarCNNTeacherConfig, in_channels: int, num_classes: int
) -> CifarCNNTeacher:
    return CifarCNNTeacher(in_channels, num_classes, cfg.dropout, cfg.input_size)


class CifarCNNStudentConfig(ModelConfigBase):
    name: Literal["cifar_cnn_student"] = "cifar_cnn_student"
    dropout: float = Field(0.5, ge=0, lt=1)
    input_size: int = Field(
        32, ge=8, description="image side in pixels; 32 gives the printed fc1 of 1024 inputs"
    )


class CifarCNNStudent(nn.Module):
    """Seed 003's ``Net_student``; see the module docstring for the forward order."""

    kind = "cifar_cnn_student"

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5, input_size: int = 32
    ):
        super().__init__()
        self.in_channels, self.input_size = in_channels, input_size
        side = _pooled_side(input_size)
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.relu = nn.ReLU()
        self.kd_layers = ["conv1", "conv2", "conv3", "fc1"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.pool(self.relu(self.conv3(x)))
        x = self.dropout(x.flatten(1))
        x = self.dropout(self.relu(self.fc1(x)))
        return self.fc2(x)


@MODELS.register(CifarCNNStudentConfig)
def build_cifar_cnn_student(
    cfg: CifarCNNStudentConfig, in_channels: int, num_classes: int
) -> CifarCNNStudent:
    return CifarCNNStudent(in_channels, num_classes, cfg.dropout, cfg.input_size)
