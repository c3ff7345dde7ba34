"""The rows a study's verdict compares, chosen from its trials in Optuna storage alone.

A row is a KD configuration against a no-KD baseline. Without arms, as the report compares them: for each
``kd.method`` and student (``model.*``), the finished tuning trial with the best validation objective,
against the best ``none`` trial with the same student, data, epochs and compute budget. With arms and
confirmation: each KD arm's confirmation configuration against the ``none`` arm's (arms.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from optuna.trial import TrialState

from harness.sweep.config import StudyConfig
from harness.sweep.optuna_study import is_current, is_extra

MATCHED = ("model.", "data.", "train.epochs", "train.budget.")  # what a KD row shares with its baseline


@dataclass(frozen=True)
class Config:
    """One configuration that is trained on more seeds: its parameters, what they train (config hash), and
    the tuning trial that chose it."""

    method: str
    config_hash: str
    params: dict[str, Any]
    trial: int
    value: float | None = None
    arm: Any = None
    student: dict[str, Any] = field(default_factory=dict)

    def attrs(self, phase: str) -> dict[str, Any]:
        """User attrs of the trials that train it on more seeds."""
        if phase != "confirmation":
            return {}
        return {"phase": "confirmation", "arm": self.arm, "tuned_by": self.trial}


@dataclass(frozen=True)
class Row:
    name: str
    kd: Config
    baseline: Config

    def configs(self) -> tuple[Config, Config]:
        return self.kd, self.baseline


def to_dict(row: Row) -> dict[str, Any]:
    return {"row": row.name, "kd": asdict(row.kd), "baseline": asdict(row.baseline)}


def candidate(study: StudyConfig, t) -> Config:
    """A finished tuning trial as a configuration."""
    flat = study.trial_config(t.params).flat()
    student = {k: v for k, v in flat.items() if k.startswith("model.")}
    return Config(
        flat["kd.method"], t.user_attrs["config_hash"], dict(t.params), t.number, t.value, None, student
    )


def finished_tuning(study: StudyConfig, trials) -> list:
    """Tuning trials that finished all their seeds under the current file, in trial order."""
    return sorted(
        (
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and not is_extra(t)
            and is_current(t, study)
            and "config_hash" in t.user_attrs
        ),
        key=lambda t: t.number,
    )


def chosen_from(study: StudyConfig, trials) -> list[int]:
    """The numbers of the finished tuning trials that rows and confirmation configurations are chosen from."""
    return [t.number for t in finished_tuning(study, trials)]


def best(configs: list[Config], maximize: bool) -> Config:
    """The best validation objective; ties go to the earlier trial."""
    return min(configs, key=lambda c: ((-c.value if maximize else c.value), c.trial))


def tuning_rows(study: StudyConfig, trials) -> list[Row]:
    """Best configuration per kd.method and student against the best ``none`` one with the same student,
    data, epochs and budget. A KD configuration without such a baseline is left out."""
    maximize = study.objective.direction == "maximize"
    found: dict[tuple, list[Config]] = {}
    for t in finished_tuning(study, trials):
        c = candidate(study, t)
        found.setdefault((c.method, tuple(sorted(c.student.items()))), []).append(c)
    chosen = {key: best(cs, maximize) for key, cs in found.items()}
    nones = [c for (method, _), cs in found.items() if method == "none" for c in cs]
    varying = _varying([c.student for c in chosen.values()])
    rows = []
    for (method, _), kd in chosen.items():
        same = [c for c in nones if _matched(study, c) == _matched(study, kd)]
        if method != "none" and same:
            name = method + "".join(f" {k.removeprefix('model.')}={kd.student[k]}" for k in varying)
            rows.append(Row(name, kd, best(same, maximize)))
    return rows


def _matched(study: StudyConfig, c: Config) -> dict[str, Any]:
    flat = study.trial_config(c.params).flat()
    return {k: v for k, v in flat.items() if k.startswith(MATCHED)}


def _varying(students: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for s in students for k in s})
    return [k for k in keys if len({str(s.get(k)) for s in students}) > 1]


def arm_rows(configs: dict[Any, Config]) -> list[Row]:
    """Each KD arm's confirmation configuration against the ``none`` arm's."""
    baseline = next((c for c in configs.values() if c.method == "none"), None)
    if baseline is None:
        return []
    return [Row(str(arm), c, baseline) for arm, c in configs.items() if c.method != "none"]
