"""``none``: hard labels only, the baseline every comparison needs."""

from __future__ import annotations

from typing import Literal

from harness.distill.base import KD_METHODS, Distiller, KDConfigBase


class NoKDConfig(KDConfigBase):
    method: Literal["none"] = "none"


@KD_METHODS.register(NoKDConfig)
class NoKD(Distiller):
    def forward(self, batch):
        return {}
