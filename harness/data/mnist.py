"""MNIST (60,000 + 10,000 handwritten digits, 28x28, 10 classes) from a local folder.

MNIST cannot be downloaded on these machines and Debian does not package it, so the four idx files must be
copied in by hand (gunzipped) to ``ROOT/MNIST/raw/``, the layout torchvision's ``MNIST(root,
download=False)`` reads. Without them, use ``digits`` (ships with scikit-learn; ``image_size: 28`` feeds the
784-input MLPs) or ``fashion_mnist`` (``make data``).
"""

from __future__ import annotations

from typing import Literal

from harness.data._splits import TorchvisionClassificationConfig, load_idx_dataset
from harness.data.base import DATA, DataSplits

FIX = (
    "MNIST cannot be downloaded here and has no Debian package: copy train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gunzipped) from a machine "
    "that has them into ROOT/MNIST/raw/, or use data.source 'digits' or 'fashion_mnist' instead"
)


class MNISTConfig(TorchvisionClassificationConfig):
    source: Literal["mnist"] = "mnist"


@DATA.register(MNISTConfig)
def load_mnist(cfg: MNISTConfig) -> DataSplits:
    from torchvision.datasets import MNIST

    return load_idx_dataset(MNIST, cfg, FIX)
