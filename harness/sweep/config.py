"""Study files: which experiment and teacher, the search space, objective, constraints, sampler, pruner,
budget and seeds (sequential seeding, arms and confirmation: schema.py). Validated completely before
anything is written to MLflow or Optuna storage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from harness.config import (
    SELECTABLE,
    ExperimentConfig,
    apply_overrides,
    build_experiment,
    describe_validation_error,
    load_experiment,
    read_yaml,
)
from harness.data.base import QUALITY
from harness.errors import ConfigError
from harness.sweep.identity import _digest, _experiment_tree, config_hash, teacher_identity
from harness.sweep.schema import (
    Arms,
    Confirm,
    Seeds,
    SeedSchedule,
    check_phases,
    default_budget,
    first_seeds,
    grid_point_list,
)
from harness.sweep.schema import Strict as _Strict

FINAL_METRICS = (
    "params",
    "kd_params",
    "flops",
    "ms_per_image",
    "train_images_per_s",
    "train_ms_per_image",
    "best_epoch",
)


class Param(_Strict):
    """One search dimension: ``choices`` (categorical) or ``low``/``high`` (int or float, optionally log).

    ``when`` makes it conditional: it is sampled only when every named key has one of the given values
    (e.g. ``when: {kd.method: [response, cwd]}``). ``key`` sets a different config key than the entry's
    name, so one key can have a different range per condition (``fitnet_beta: {key: kd.beta, ...}``).
    """

    key: str | None = None
    choices: list[Any] | None = None
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    type: Literal["int", "float"] | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs choices, or both low and high")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high}); swap them")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        return self

    @property
    def kind(self) -> str:
        """categorical, int (explicit, or low and high both written as integers) or float."""
        if self.choices is not None:
            return "categorical"
        if self.type:
            return self.type
        ints = all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)
        return "int" if ints else "float"

    def target(self, name: str) -> str:
        return self.key or name

    def active(self, values: dict[str, Any]) -> bool:
        for key, wanted in self.when.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if values.get(key) not in allowed:
                return False
        return True

    def example_values(self) -> list[Any]:
        if self.choices is not None:
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


class Objective(_Strict):
    metric: str = "val/miou"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v.startswith("test/"):
            raise ValueError(
                f"{v} is a test metric: the test split is kept for the final report, never for choosing "
                f"configurations; use val/{v.removeprefix('test/')}"
            )
        if not (v.startswith("val/") or v in FINAL_METRICS):
            raise ValueError(f"unknown metric {v!r}; use val/<metric> or one of {list(FINAL_METRICS)}")
        return v


class Constraint(_Strict):
    metric: str
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.max is None) == (self.min is None):
            raise ValueError("a constraint needs exactly one of max or min")
        Objective(metric=self.metric)
        return self

    def violation(self, value: float) -> float:
        """<= 0 when satisfied, as Optuna's constraints_func expects."""
        return value - self.max if self.max is not None else self.min - value


class Sampler(_Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = 0
    startup_trials: int = Field(5, ge=0, description="tpe: random trials before TPE takes over")


class Pruner(_Strict):
    """``median`` and ``hyperband`` follow one seed's per-epoch validation curve; ``wilcoxon`` (several
    seeds) judges a trial's per-seed values against the best trial's on the same seeds."""

    name: Literal["none", "median", "hyperband", "wilcoxon"] = "none"
    warmup_epochs: int = Field(1, ge=0)
    startup_trials: int = Field(3, ge=0)
    p_threshold: float = Field(0.1, gt=0, lt=1, description="wilcoxon: prune below this p-value")


class Budget(_Strict):
    trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0, description="seconds")

    @model_validator(mode="after")
    def _check(self):
        if self.trials is None and self.timeout is None:
            raise ValueError("set budget.trials or budget.timeout (or both)")
        return self


class StudyConfig(_Strict):
    name: str
    experiment: str
    teacher: str | None = None
    objective: Objective = Field(default_factory=Objective)
    constraints: list[Constraint] = Field(default_factory=list)
    budget: Budget
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    seeds: Seeds = Field(default_factory=lambda: [0])
    min_effect: float | None = Field(None, gt=0, allow_inf_nan=False, description="equivalence margin")
    arms: Arms | None = None
    confirm: Confirm | None = None
    fixed: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Param] = Field(default_factory=dict)
    _configs: dict = PrivateAttr(default_factory=dict)  # trial_config by parameters
    _keys: dict = PrivateAttr(default_factory=dict)  # trial_key by parameters

    @model_validator(mode="after")
    def _check(self):
        if self.seed_keys() and "seeds" in self.model_fields_set:
            raise ValueError(
                f"{self.seed_keys()} set train.seed and seeds is listed too, so each trial's seed would be "
                "set twice; drop seeds, or drop train.seed and list the seeds in seeds"
            )
        overlap = set(self.fixed) & {p.target(k) for k, p in self.search.items()}
        if overlap:
            raise ValueError(f"{sorted(overlap)} both fixed and searched; keep it in one of them")
        targets = {p.target(k) for k, p in self.search.items()}
        seen = set(self.fixed)
        for key, param in self.search.items():
            unknown = [k for k in param.when if k not in targets and k not in self.fixed]
            if unknown:
                raise ValueError(
                    f"search.{key}.when refers to {unknown}, which is neither searched nor fixed"
                )
            later = [k for k in param.when if k not in seen]
            if later:
                raise ValueError(f"search.{key}.when depends on {later}; list {later} above {key} in search")
            seen.add(param.target(key))
        if self.sampler.name == "grid":
            bad = [k for k, p in self.search.items() if p.choices is None]
            if bad:
                raise ValueError(f"the grid sampler needs choices for every parameter; {bad} are ranges")
        per_epoch = self.pruner.name in ("median", "hyperband")
        n = len(first_seeds(self.seeds))
        if per_epoch and n > 1:
            raise ValueError(
                f"pruner {self.pruner.name} follows one seed's per-epoch curve but {n} seeds "
                "are listed; use pruner: {name: wilcoxon} (judges per-seed values) or one seed"
            )
        if self.pruner.name == "wilcoxon" and n < 2:
            raise ValueError("pruner wilcoxon judges per-seed values; list at least 2 seeds or use median")
        check_phases(self)
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, tree: Any) -> Any:
        return default_budget(tree) if isinstance(tree, dict) else tree

    def grid(self) -> list[dict[str, Any]]:
        """The grid's points (conditional entries only where their ``when`` holds): schema.grid_point_list."""
        return grid_point_list({k: p.model_dump() for k, p in self.search.items()}, self.fixed)

    def seed_keys(self) -> list[str]:
        """The fixed keys and search entries that set ``train.seed`` (by the key they set, not their name)."""
        fixed = [f"fixed.{k}" for k in self.fixed if k == "train.seed"]
        return fixed + [f"search.{k}" for k, p in self.search.items() if p.target(k) == "train.seed"]

    def targets(self) -> set[str]:
        return set(self.fixed) | {p.target(k) for k, p in self.search.items()}

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Experiment overrides for sampled ``params`` (keyed by search entry name)."""
        out = dict(self.fixed)
        if self.teacher:
            out["teacher"] = self.teacher
        metric = self.objective.metric
        chosen = metric in SELECTABLE and metric.removeprefix("val/") not in QUALITY.values()
        if chosen and "train.select_on" not in self.targets():  # the best epoch is judged as trials are
            out["train.select_on"] = metric
        out.update({self.search[k].target(k) if k in self.search else k: v for k, v in params.items()})
        return out

    def trial_config(self, params: dict[str, Any]) -> ExperimentConfig:
        """The experiment config a trial with ``params`` trains, built once per process: a file edited
        during a sweep changes neither what its trials train nor what they count as."""
        frozen = tuple(sorted(params.items()))
        if frozen not in self._configs:
            self._configs[frozen] = load_experiment(self.experiment, self.overrides(params))
        return self._configs[frozen]

    def trial_seeds(self, cfg: ExperimentConfig) -> list[int]:
        """A study that fixes or searches train.seed trains that one seed; otherwise its (first) seeds."""
        return [cfg.train.seed] if self.seed_keys() else first_seeds(self.seeds)

    def schedule(self) -> tuple[SeedSchedule | None, str]:
        """The seeds schedule that sequential rounds follow, if any, and the phase they run in."""
        if self.confirm is not None:
            seeds = self.confirm.seeds
            return (seeds if isinstance(seeds, SeedSchedule) else None), "confirmation"
        return (self.seeds if isinstance(self.seeds, SeedSchedule) else None), "tuning"

    def trial_key(self, params: dict[str, Any]) -> tuple[str, tuple[int, ...]] | None:
        """What a trial with ``params`` trains under this file: (config hash, seeds); None when the
        parameters no longer make a valid config (e.g. a search entry was removed)."""
        frozen = tuple(sorted(params.items()))
        if frozen not in self._keys:
            try:
                cfg = self.trial_config(params)
                self._keys[frozen] = (config_hash(cfg), tuple(self.trial_seeds(cfg)))
            except ConfigError:
                self._keys[frozen] = None
        return self._keys[frozen]

    def definition(self) -> dict[str, Any]:
        """What decides which configurations the study trains and how they are judged; stored with the
        study, so a run of a changed file can say what changed."""
        teacher = self.teacher or read_yaml(self.experiment).get("teacher")
        return {
            "objective": self.objective.model_dump(),
            "constraints": [c.model_dump(exclude_none=True) for c in self.constraints],
            "experiment": {"file": self.experiment, "digest": _digest(_experiment_tree(self.experiment))},
            "teacher": {"file": teacher, "identity": teacher_identity(teacher)} if teacher else None,
            "seeds": self.model_dump(mode="json")["seeds"],
            "fixed": json.loads(json.dumps(self.fixed, default=str)),
            "search": {k: p.model_dump(mode="json", exclude_defaults=True) for k, p in self.search.items()},
            **self.model_dump(mode="json", include={"min_effect", "arms", "confirm"}, exclude_none=True),
        }


def load_study(path: str | Path, name: str | None = None) -> StudyConfig:
    """Read and fully validate a study file; every problem is reported as `file: key: message`.

    ``name`` (the CLI's --study-name) replaces the file's name: the same file as a new study."""
    path = Path(path)
    tree = read_yaml(path)
    tree.setdefault("name", path.stem)
    if name:
        tree["name"] = name
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(str(path), exc)) from None
    if not Path(study.experiment).is_file():
        raise ConfigError(
            f"{path}: experiment: file {study.experiment} not found; point it at a file in experiments/"
        )
    if study.teacher and not Path(study.teacher).is_file():
        raise ConfigError(
            f"{path}: teacher: file {study.teacher} not found; point it at an experiment file or checkpoint"
        )
    check_search_space(study, str(path))
    return study


def example_params(study: StudyConfig, limit: int = 512):
    """Sampled-parameter dicts covering every combination of categorical values and both ends of every
    range (conditional parameters only where active), at most ``limit`` of them."""
    keys = list(study.search)
    for combo in itertools.islice(
        itertools.product(*(study.search[k].example_values() for k in keys)), limit
    ):
        params: dict[str, Any] = {}
        values = dict(study.fixed)
        for k, v in zip(keys, combo):
            if study.search[k].active(values):
                params[k] = values[study.search[k].target(k)] = v
        yield params


def example_experiment(study: StudyConfig) -> ExperimentConfig:
    """The experiment config of the first example trial (to find the teacher, the epoch count, ...)."""
    return load_experiment(study.experiment, study.overrides(next(example_params(study))))


def check_search_space(study: StudyConfig, source: str) -> None:
    """Build the experiment config of every example trial, so a misspelt key or an impossible value fails
    now rather than in trial 17."""
    base = read_yaml(study.experiment)
    base.setdefault("name", Path(study.experiment).stem)
    for params in example_params(study):
        tree = apply_overrides(base, study.overrides(params))
        try:
            build_experiment(tree, source)
        except ConfigError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(
                f"{first} (with {params or 'the fixed values'}); fix search/fixed in the study file"
            ) from None
