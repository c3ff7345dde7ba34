"""KD methods, one module each, behind the ``Distiller`` interface of ``base``."""

from harness.distill.base import KD_METHODS, Distiller, KDBatch, KDConfigBase
from harness.registry import import_submodules

import_submodules(__name__)

__all__ = ["KD_METHODS", "Distiller", "KDBatch", "KDConfigBase"]
