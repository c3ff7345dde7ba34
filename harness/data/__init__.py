"""Data sources, one module each; ``load_data(cfg)`` builds the splits a config asks for."""

from harness.data.base import DATA, IGNORE_INDEX, DataSplits, Normalization, TensorSplit
from harness.data.normalize import normalize_splits
from harness.registry import import_submodules

import_submodules(__name__)


def load_data(cfg) -> DataSplits:
    data = DATA.build(cfg)
    if isinstance(cfg.normalize, Normalization):  # classification sources also take true (train statistics)
        normalize_splits(data, cfg.normalize)
    return data


__all__ = ["DATA", "IGNORE_INDEX", "DataSplits", "TensorSplit", "load_data"]
