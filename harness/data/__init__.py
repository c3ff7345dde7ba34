"""Data sources, one module each; ``load_data(cfg)`` builds the splits a config asks for."""

from harness.data.base import DATA, IGNORE_INDEX, DataSplits, TensorSplit
from harness.registry import import_submodules

import_submodules(__name__)


def load_data(cfg) -> DataSplits:
    return DATA.build(cfg)


__all__ = ["DATA", "IGNORE_INDEX", "DataSplits", "TensorSplit", "load_data"]
