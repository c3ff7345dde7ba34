"""Equal tuning, then confirmation.

Each value of the search entry ``arms.key`` (e.g. every ``kd.method``, ``none`` included) is an arm, and
every arm gets ``arms.trials`` tuning trials (user attrs ``phase: tuning``, ``arm``): before each trial the
study's sampler is pointed at the arm with the fewest, and an arm's own sampler sees only that arm's
trials (TPE models each arm's other parameters on its own history; a grid enqueues each arm's points).
After tuning, the best configuration of each arm on the validation objective is retrained on the
confirmation seeds, which no tuning trial used (``phase: confirmation``): re-using the tuning seeds would
favour whichever arm had the luckiest draw. Per-arm tuning trial counts are recorded (study user attr
``tuning``), so an arm that got fewer (failures, a timeout) shows; the chosen configurations in
``confirmation``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Any

import optuna
from optuna.samplers import BaseSampler

from harness.engine.progress import console
from harness.sweep.config import StudyConfig
from harness.sweep.optuna_study import COUNTED_STATES, is_current, is_extra, make_sampler, trial_state
from harness.sweep.rows import Config, best, candidate, finished_tuning

TUNING_STATES = (*COUNTED_STATES, "running")


class ArmView:
    """The study as one arm's sampler sees it: that arm's trials only (and trials not sampled yet)."""

    def __init__(self, study: optuna.Study, key: str, arm: Any):
        self._study, self._key, self._arm = study, key, arm

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _mine(self, trials):
        return [t for t in trials if t.params.get(self._key, self._arm) == self._arm]

    def _get_trials(self, deepcopy=True, states=None, use_cache=False):
        return self._mine(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))

    def get_trials(self, deepcopy=True, states=None):
        return self._mine(self._study.get_trials(deepcopy=deepcopy, states=states))

    @property
    def trials(self):
        return self.get_trials()


class ArmSampler(BaseSampler):
    """Samples one arm: ``key`` is fixed to ``arm``, the other parameters come from ``base`` looking at the
    arm's own trials."""

    def __init__(self, base: BaseSampler, key: str, arm: Any):
        self.base, self.key, self.arm = base, key, arm

    def _view(self, study):
        return ArmView(study, self.key, self.arm)

    def infer_relative_search_space(self, study, trial):
        space = self.base.infer_relative_search_space(self._view(study), trial)
        return {k: d for k, d in space.items() if k != self.key}

    def sample_relative(self, study, trial, search_space):
        return self.base.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name == self.key:
            return self.arm
        return self.base.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(self._view(study), trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(self._view(study), trial, state, values)


def arms_of(cfg: StudyConfig) -> list[Any]:
    return list(cfg.search[cfg.arms.key].choices)


def tuning_trials(cfg: StudyConfig, trials, arm: Any, before: float = math.inf) -> int:
    """Tuning trials of ``arm`` that count (finished, pruned, diverged, failed under the current file),
    and those running with a number below ``before``: the arm's share of the budget taken."""
    n = 0
    for t in trials:
        if is_extra(t) or t.number >= before or t.params.get(cfg.arms.key) != arm:
            continue
        state = trial_state(t)
        n += (state in COUNTED_STATES and is_current(t, cfg)) or state == "running"
    return n


class ArmTuner:
    """Called before each tuning trial: points the study's sampler at the arm with the fewest trials."""

    def __init__(self, cfg: StudyConfig, study: optuna.Study, worker: int = 0):
        stored = len(study.get_trials(deepcopy=False))
        self.cfg, self.study = cfg, study
        self.samplers = {
            arm: ArmSampler(make_sampler(cfg, worker, stored, arm=i), cfg.arms.key, arm)
            for i, arm in enumerate(arms_of(cfg))
        }

    def __call__(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        arm = min(self.samplers, key=lambda a: tuning_trials(self.cfg, trials, a))
        self.study.sampler = self.samplers[arm]


def tuning_counts(cfg: StudyConfig, trials) -> dict[str, Any]:
    """Per arm, its tuning trials by state; ``short``: arms that got fewer than another arm."""
    arms: dict[str, dict[str, int]] = {}
    for arm in arms_of(cfg):
        mine = [
            t for t in trials if not is_extra(t) and is_current(t, cfg) and t.params.get(cfg.arms.key) == arm
        ]
        states = [trial_state(t) for t in mine]
        counts = {s: states.count(s) for s in COUNTED_STATES}
        arms[str(arm)] = {"trials": sum(counts.values()), **counts}
    most = max((a["trials"] for a in arms.values()), default=0)
    short = {arm: a["trials"] for arm, a in arms.items() if a["trials"] < most}
    return {"key": cfg.arms.key, "trials_per_arm": cfg.arms.trials, "arms": arms, "short": short}


def record_tuning(cfg: StudyConfig, study: optuna.Study) -> dict[str, Any]:
    counts = tuning_counts(cfg, study.get_trials(deepcopy=False))
    if counts["short"]:
        got = ", ".join(f"{arm} {n}" for arm, n in counts["short"].items())
        console.print(f"[yellow]note[/yellow]: arms got unequal tuning: {got} of {cfg.arms.trials} trials")
    if study.user_attrs.get("tuning") != counts:
        study.set_user_attr("tuning", counts)
    return counts


def confirmation_configs(cfg: StudyConfig, study: optuna.Study) -> dict[Any, Config]:
    """The best finished tuning configuration of each arm on the validation objective (an arm none of
    whose trials finished has none), recorded in the study's user attr ``confirmation``."""
    maximize = cfg.objective.direction == "maximize"
    finished = finished_tuning(cfg, study.get_trials(deepcopy=False))
    configs = {}
    for arm in arms_of(cfg):
        mine = [candidate(cfg, t) for t in finished if t.params.get(cfg.arms.key) == arm]
        if mine:
            configs[arm] = replace(best(mine, maximize), arm=arm)
    tree = {
        "seeds": cfg.model_dump(mode="json")["confirm"]["seeds"],
        "chosen_from": [t.number for t in finished],
        "arms": [asdict(c) for c in configs.values()],
    }
    if study.user_attrs.get("confirmation") != tree:
        study.set_user_attr("confirmation", tree)
    missing = [str(a) for a in arms_of(cfg) if a not in configs]
    if missing:
        console.print(f"[yellow]note[/yellow]: arms {missing} have no finished tuning trial to confirm")
    return configs
