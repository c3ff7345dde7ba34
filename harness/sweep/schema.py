"""Study-file keys for seeding until decided and for equal tuning then confirmation: a seeds schedule
``{first, max, step, start}``, ``min_effect``, ``arms`` and ``confirm``. They are validated with the rest of
the study file (config.py); rounds.py runs the rounds, arms.py the arms and the confirmation."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from harness.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedSchedule(Strict):
    """Seeds ``start`` .. ``start + first - 1`` for every compared configuration; then, in rounds, ``step``
    more for the comparisons still undecided, until each is decided or has ``max`` seeds."""

    first: int
    max: int
    step: int = 2
    start: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        try:
            self.looks()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def looks(self) -> list[int]:
        """The seed counts at which the rows are judged: first, first + step, ..., max."""
        # imported here: harness.report's package init loads every report module, which only a study with
        # a schedule should depend on
        from harness.report.sequential import looks

        return looks(self.first, self.step, self.max)

    def seeds(self, n: int) -> list[int]:
        """The first ``n`` seeds of the schedule."""
        return list(range(self.start, self.start + n))

    def describe(self) -> str:
        last = self.start + self.max - 1
        return f"first {self.first}, step {self.step}, max {self.max} (seeds {self.start}-{last})"


def parse_seeds(value: Any) -> list[int] | SeedSchedule:
    """A list of seeds, or a schedule; one line naming what is wrong otherwise."""
    if isinstance(value, SeedSchedule):
        return value
    if isinstance(value, dict):
        try:
            return SeedSchedule.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            unknown = err["type"] == "extra_forbidden"
            msg = "unknown key; use first, max, step, start" if unknown else err["msg"]
            raise ValueError(f"{where + ': ' if where else ''}{msg.removeprefix('Value error, ')}") from None
    if not isinstance(value, list) or not all(isinstance(s, int) for s in value):
        raise ValueError("give a list of seeds, e.g. [0, 1, 2], or a schedule {first: 3, max: 20, step: 2}")
    if not value:
        raise ValueError("no seeds; list at least one")
    if len(set(value)) != len(value):
        raise ValueError("seeds has duplicates; list each seed once")
    return value


Seeds = Annotated[list[int] | SeedSchedule, BeforeValidator(parse_seeds)]


def first_seeds(seeds: list[int] | SeedSchedule) -> list[int]:
    return list(seeds) if isinstance(seeds, list) else seeds.seeds(seeds.first)


def all_seeds(seeds: list[int] | SeedSchedule) -> list[int]:
    return list(seeds) if isinstance(seeds, list) else seeds.seeds(seeds.max)


class Arms(Strict):
    """Equal tuning: each value of the search entry ``key`` is an arm, and every arm gets ``trials``
    tuning trials with the search restricted to it (a grid: the grid points of the arm)."""

    key: str
    trials: int | None = Field(None, ge=1, description="tuning trials per arm; a grid: its points per arm")


class Confirm(Strict):
    """After tuning, the best configuration of each arm (validation objective) is retrained on these
    seeds, which no tuning trial used; a schedule runs sequential rounds on them."""

    seeds: Seeds


def grid_point_list(
    search: dict[str, Any], fixed: dict[str, Any] | None = None, leave_out: str | None = None
) -> list[dict[str, Any]]:
    """Every point of a grid, by search entry name: the product of the entries' choices, in file order, with
    a conditional entry (``when``) only in the points where its condition holds on the fixed keys and the
    entries before it (so ``none`` is not repeated for every temperature of ``response``)."""
    points: list[dict[str, Any]] = [{}]
    targets: list[dict[str, Any]] = [dict(fixed or {})]
    for name, entry in search.items():
        if not isinstance(entry, dict) or name == leave_out:
            continue
        target, when = entry.get("key") or name, entry.get("when") or {}
        grown, grown_targets = [], []
        for point, values in zip(points, targets):
            holds = all(
                values.get(k) in (wanted if isinstance(wanted, list) else [wanted])
                for k, wanted in when.items()
            )
            for choice in (entry.get("choices") or []) if holds else [None]:
                grown.append({**point, name: choice} if holds else point)
                grown_targets.append({**values, target: choice} if holds else values)
        points, targets = grown, grown_targets
    return points


def grid_points(
    search: dict[str, Any], leave_out: str | None = None, fixed: dict[str, Any] | None = None
) -> int:
    return max(1, len(grid_point_list(search, fixed, leave_out)))


def default_budget(tree: dict[str, Any]) -> dict[str, Any]:
    """A grid study's budget defaults to its number of points; an arms study's trials are arms x trials
    per arm (a grid arm's trials default to its points)."""
    sampler, search, arms = tree.get("sampler") or {}, tree.get("search") or {}, tree.get("arms")
    if not isinstance(search, dict):
        return tree
    grid = isinstance(sampler, dict) and sampler.get("name") == "grid"
    if isinstance(arms, dict):
        if grid and "trials" not in arms:
            tree = {**tree, "arms": {**arms, "trials": grid_points(search, arms.get("key"))}}
        entry = search.get(arms.get("key"))
        choices = entry.get("choices") if isinstance(entry, dict) else None
        per_arm = tree["arms"].get("trials")
        budget = tree.get("budget", {})
        if isinstance(budget, dict) and "trials" not in budget:
            # arms without choices get a stand-in budget, so that check_arms names the real problem
            trials = len(choices) * per_arm if isinstance(per_arm, int) and choices else 1
            return {**tree, "budget": {**budget, "trials": trials}}
    if grid and "budget" not in tree:
        return {**tree, "budget": {"trials": grid_points(search, fixed=tree.get("fixed"))}}
    return tree


def searches_baseline(study) -> bool:
    """Whether the study searches kd.method with ``none`` among its choices: the baseline every KD row is
    compared with."""
    return any(p.target(k) == "kd.method" and "none" in (p.choices or []) for k, p in study.search.items())


def check_phases(study) -> None:
    """The rules between seeds, min_effect, arms and confirm (ValueError: one line, key and fix)."""
    if isinstance(study.seeds, SeedSchedule):
        if study.confirm is not None:
            raise ValueError(
                "seeds is a schedule and confirm is set: the verdict rests on the confirmation seeds; "
                "give seeds as a list (the tuning seeds) and the schedule as confirm.seeds"
            )
        if not searches_baseline(study):
            raise ValueError(
                "seeds {first, max, step} adds seeds to KD configurations against the no-KD baseline, but "
                "kd.method is not searched with none among its choices; search it, or list the seeds"
            )
    if study.arms is not None:
        check_arms(study)
    if study.confirm is not None:
        check_confirm(study)


def check_arms(study) -> None:
    arms = study.arms
    entry = study.search.get(arms.key)
    if entry is None or entry.choices is None or entry.when:
        raise ValueError(
            f"arms.key {arms.key!r} is not a search entry with plain choices; name one, e.g. kd.method"
        )
    if arms.trials is None:
        raise ValueError("arms.trials is missing; give the tuning trials every arm gets")
    if study.sampler.name == "grid":
        per_arm = grid_points({k: p.model_dump() for k, p in study.search.items()}, arms.key)
        if arms.trials != per_arm:
            raise ValueError(
                f"arms.trials is {arms.trials} but the grid has {per_arm} points per arm; drop arms.trials"
            )
    total = len(entry.choices) * arms.trials
    if study.budget.trials is not None and study.budget.trials != total:
        raise ValueError(
            f"budget.trials is {study.budget.trials} but {len(entry.choices)} arms x {arms.trials} trials "
            f"make {total}; drop budget.trials (it follows arms) or make them agree"
        )


def check_confirm(study) -> None:
    if study.arms is None:
        raise ValueError(
            "confirm retrains the best configuration of each arm; declare arms: {key: kd.method, trials: N}"
        )
    if study.seed_keys():
        raise ValueError(
            f"confirm needs the tuning seeds listed in seeds, but {study.seed_keys()} set train.seed; "
            "drop train.seed"
        )
    overlap = sorted(set(first_seeds(study.seeds)) & set(all_seeds(study.confirm.seeds)))
    if overlap:
        raise ValueError(
            f"confirm.seeds {overlap} are tuning seeds too: re-using them favours the luckiest arm; "
            "use seeds no tuning trial used (e.g. start: 100)"
        )
    entry = study.search[study.arms.key]
    if isinstance(study.confirm.seeds, SeedSchedule) and not (
        entry.target(study.arms.key) == "kd.method" and "none" in entry.choices
    ):
        raise ValueError(
            "confirm.seeds as a schedule compares each KD arm with the none arm; use arms.key kd.method "
            "with none among its choices, or list the confirmation seeds"
        )
