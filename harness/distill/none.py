"""``none``: hard labels only, the baseline every comparison needs."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from harness.distill.base import KD_METHODS, Distiller, KDConfigBase


class NoKDConfig(KDConfigBase):
    method: Literal["none"] = "none"

    @model_validator(mode="after")
    def _hard_labels(self):
        if self.regime in ("soft", "sequential"):  # with no KD term, alpha 0 would train on nothing
            raise ValueError(
                f"kd.method none has no soft labels to train on, so kd.regime {self.regime!r} would train "
                "on nothing; use regime mixed or hard (in a study: make kd.regime conditional on the method)"
            )
        return self


@KD_METHODS.register(NoKDConfig)
class NoKD(Distiller):
    def forward(self, batch):
        return {}
