"""Fashion-MNIST (Zalando; 60,000 + 10,000 images, 28x28, 10 classes) from Debian's dataset-fashion-mnist.

Nothing is downloaded: ``make data`` (scripts/get-fashion-mnist.sh) installs the Debian package and
unpacks its four ``*-idx*-ubyte.gz`` files into ``data/FashionMNIST/raw/``, the layout torchvision's
``FashionMNIST(root, download=False)`` reads. The whole set is loaded once into tensors; the official train
set is split into train/val (seeded, stratified), the official test set is the test split.
"""

from __future__ import annotations

from typing import Literal

from harness.data._splits import TorchvisionClassificationConfig, load_idx_dataset
from harness.data.base import DATA, DataSplits

FIX = "run `make data` (installs Debian's dataset-fashion-mnist and unpacks it)"


class FashionMNISTConfig(TorchvisionClassificationConfig):
    source: Literal["fashion_mnist"] = "fashion_mnist"


@DATA.register(FashionMNISTConfig)
def load_fashion_mnist(cfg: FashionMNISTConfig) -> DataSplits:
    from torchvision.datasets import FashionMNIST

    return load_idx_dataset(FashionMNIST, cfg, FIX)
