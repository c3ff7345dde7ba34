"""What the study file asked for, as the report needs it: its seeds (a list, or rounds), ``min_effect``,
``arms`` and ``confirm``.

The sweep logs the study file on the parent run as the artifact ``study.yaml`` (``StudyConfig.model_dump``);
the report reads it from there, so it does not depend on the sweep's internal records. A parent run without
it (logged before it existed) falls back to the ``seeds`` param: a fixed list, no margin, no arms.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError


class DesignError(HarnessError):
    """A study.yaml the report cannot read: the message names the field and the fix."""

    exit_code = 2


@dataclass(frozen=True)
class Rounds:
    """Seed rounds (``seeds: {first: 3, max: 20, step: 2}``): ``first`` seeds for every row, then ``step``
    more for each row still undecided, up to ``max``; seeds are ``start``, ``start + 1``, ..."""

    first: int
    max: int
    step: int
    start: int = 0

    def text(self) -> str:
        last = self.start + self.max - 1
        return f"first {self.first}, step {self.step}, max {self.max} (seeds {self.start}-{last})"


Seeds = list[int] | Rounds


def seeds_text(seeds: Seeds) -> str:
    return f"rounds, {seeds.text()}" if isinstance(seeds, Rounds) else str(seeds)


@dataclass(frozen=True)
class Design:
    seeds: Seeds | None = None
    min_effect: float | None = None
    arms: dict[str, Any] | None = None  # {key: kd.method, trials: 8}
    confirm: Seeds | None = None  # the confirmation seeds, when the study confirms each arm's best

    @property
    def verdict_seeds(self) -> Seeds | None:
        """The seeds the baseline verdicts rest on: the confirmation's when the study confirms."""
        return self.confirm if self.confirm is not None else self.seeds

    @property
    def rounds(self) -> Rounds | None:
        """The schedule of the verdict seeds when it is sequential (then verdicts are sequential too)."""
        seeds = self.verdict_seeds
        return seeds if isinstance(seeds, Rounds) else None


def seeds_of(value: Any, field: str) -> Seeds | None:
    """A study file's seeds: a list of ints, or a rounds dict."""
    if value is None:
        return None
    if isinstance(value, str):  # the parent's ``seeds`` param as MLflow stores it: "[0, 1, 2]"
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None  # "one per trial: search.train.seed": no list to read
    if isinstance(value, dict):
        try:
            first, top = int(value["first"]), int(value["max"])
            return Rounds(first, top, int(value.get("step", 2)), int(value.get("start", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise DesignError(
                f"study.yaml {field}: {value} is not a seed schedule ({err}); "
                "give {first: 3, max: 20, step: 2} (start optional)"
            ) from None
    if isinstance(value, (list, tuple)) and all(isinstance(s, int) for s in value):
        return list(value)
    raise DesignError(f"study.yaml {field}: {value!r} is neither a list of seeds nor a schedule")


def margin_of(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise DesignError(f"study.yaml min_effect: {value!r} must be a positive number (e.g. 0.01) or unset")


def design_of(tree: dict | None, seeds_param: Any = None) -> Design:
    """The design from the parsed study.yaml, or from the parent's ``seeds`` param when there is none."""
    if not tree:
        return Design(seeds=seeds_of(seeds_param, "seeds"))
    confirm = tree.get("confirm") or None
    return Design(
        seeds=seeds_of(tree.get("seeds"), "seeds"),
        min_effect=margin_of(tree.get("min_effect")),
        arms=tree.get("arms") or None,
        confirm=seeds_of(confirm.get("seeds"), "confirm.seeds") if isinstance(confirm, dict) else None,
    )
