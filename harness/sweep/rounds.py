"""Seeds until decided: after tuning, more seeds go only to the compared rows still undecided, round by
round, until each is decided or has the schedule's ``max`` seeds (``report/sequential.py`` decides; its
rule keeps the error rate under this optional stopping).

Every seed's final metrics are stored with its trial (user attrs ``seed_metrics`` and ``seed_states``), so
the rounds are replayed from Optuna storage alone: the rows (rows.py: a function of the finished tuning
trials, which no longer change once tuning is over, so the family never grows), then round after round
the seeds each row has, until a round lacks seeds. Those are enqueued as trials of the rows'
configurations (user attrs ``round`` and ``seeds``; they do not count toward the budget). A killed round
re-run by the same command continues: a seed is trained once per configuration hash, whichever trial
trained it. The state after each round is the study's user attr ``sequential``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.data.base import quality_metric, task_of
from harness.engine.progress import console
from harness.sweep.leases import recover_dead_trials
from harness.sweep.optuna_study import POLL_SECONDS, SurplusTrial, TrialDiverged, TrialFailed
from harness.sweep.rows import Config, Row, to_dict
from harness.sweep.schema import SeedSchedule

CATCH = (TrialDiverged, TrialFailed, SurplusTrial)
RESULT_FIELDS = (
    "verdict", "n", "mean", "low", "high", "p", "p_equivalent", "p_holm", "p_holm_equivalent",
    "seeds_needed", "seeds_needed_min_effect",
)  # fmt: skip


def seed_values(trials, metric: str) -> dict[str, dict[int, float]]:
    """Per configuration hash, each finished seed's ``metric`` (the earliest trial's, if two trained it)."""
    out: dict[str, dict[int, float]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        mine = out.setdefault(t.user_attrs.get("config_hash"), {})
        for seed, metrics in (t.user_attrs.get("seed_metrics") or {}).items():
            if metric in metrics and math.isfinite(metrics[metric]):
                mine.setdefault(int(seed), metrics[metric])
    return out


def ended_seeds(trials) -> dict[str, set[int]]:
    """Per configuration hash, the seeds whose run ended (finished, diverged or failed): not trained again."""
    out: dict[str, set[int]] = {}
    for t in trials:
        states = t.user_attrs.get("seed_states") or {}
        out.setdefault(t.user_attrs.get("config_hash"), set()).update(int(s) for s in states)
    return out


def in_flight(trials, before: float = math.inf) -> dict[str, set[int]]:
    """Per configuration hash, the seeds a waiting or running trial (numbered below ``before``) will train."""
    out: dict[str, set[int]] = {}
    for t in trials:
        if t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < before:
            out.setdefault(t.user_attrs.get("config_hash"), set()).update(t.user_attrs.get("seeds") or [])
    return out


def decision_metric(trials) -> str:
    """The task's test quality metric (test/miou, test/accuracy): what the rows are judged on."""
    names = {k for t in trials for m in (t.user_attrs.get("seed_metrics") or {}).values() for k in m}
    return f"test/{quality_metric(task_of(names))}"


@dataclass(frozen=True)
class Need:
    """Seeds a configuration must have; ``attrs`` go on the trials that train them."""

    config: Config
    seeds: list[int]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Family:
    """What the rounds compare and how, fixed when they begin: the rows, the schedule, the phase whose
    seeds they run on, the margin, and the finished tuning trials the rows were chosen from."""

    rows: list[Row]
    schedule: SeedSchedule
    phase: str = "tuning"
    min_effect: float | None = None
    chosen_from: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    """Where the rounds stand: round ``round`` lacks ``needs`` (or, ``done``, every row stopped)."""

    round: int
    lengths: list[int]  # seeds each row is given
    results: list | None  # sequential.SequentialResult per row, after the last complete round
    needs: list[Need]
    undecided: list[int]  # rows the missing round adds seeds to
    done: bool


def replay(family: Family, values: dict[str, dict[int, float]], ended: dict[str, set[int]]) -> Progress:
    """Re-run the rounds on the seeds trained so far: each row starts with the schedule's first seeds;
    after each round, decide() judges every row on its own seeds and the rows not stopped get the next
    look's seeds; the first round some seed of which has not ended is returned."""
    from harness.report.sequential import decide

    rows, schedule, phase = family.rows, family.schedule, family.phase
    looks = schedule.looks()
    lengths, results, undecided = [looks[0]] * len(rows), None, list(range(len(rows)))
    for k in range(len(looks)):
        needs = _missing(rows, lengths, schedule, ended, phase, k)
        if needs:
            return Progress(k, lengths, results, needs, undecided, False)
        diffs = [_paired(values, row, schedule.seeds(n)) for row, n in zip(rows, lengths)]
        results = decide(diffs, maximize=True, min_effect=family.min_effect, max_seeds=schedule.max)
        undecided = [
            i for i, (r, n) in enumerate(zip(results, lengths)) if r.stopped is None and n < schedule.max
        ]
        if not undecided:
            break
        lengths = [_next(looks, n) if i in undecided else n for i, n in enumerate(lengths)]
    return Progress(k, lengths, results, [], [], True)


def _next(looks: list[int], n: int) -> int:
    return next(look for look in looks if look > n)


def _paired(values: dict[str, dict[int, float]], row: Row, seeds: list[int]) -> list[float]:
    """KD minus baseline over the row's seeds both finished, in seed order (higher is better)."""
    kd, base = values.get(row.kd.config_hash, {}), values.get(row.baseline.config_hash, {})
    return [kd[s] - base[s] for s in seeds if s in kd and s in base]


def _missing(rows, lengths, schedule, ended, phase, k) -> list[Need]:
    """The seeds each configuration lacks for this round; a shared baseline gets the union of its rows'."""
    want: dict[str, tuple[Config, int]] = {}
    for row, n in zip(rows, lengths):
        for c in row.configs():
            want[c.config_hash] = (c, max(n, want.get(c.config_hash, (c, 0))[1]))
    needs = []
    for key, (c, n) in want.items():
        seeds = [s for s in schedule.seeds(n) if s not in ended.get(key, set())]
        if seeds:
            needs.append(Need(c, seeds, {**c.attrs(phase), "round": k}))
    return needs


def train_needs(
    study: optuna.Study,
    runner,
    needs: list[Need],
    *,
    close_runs: Callable[[int, str], None],
    callbacks=(),
) -> None:
    """Enqueue the seeds no trial has ended or is training, and run trials here until every seed in
    ``needs`` has ended (other workers may train some of them meanwhile)."""
    while True:
        recover_dead_trials(study, close_runs)
        trials = study.get_trials(deepcopy=False)
        ended, flying = ended_seeds(trials), in_flight(trials)
        left = False
        for need in needs:
            key = need.config.config_hash
            todo = [s for s in need.seeds if s not in ended.get(key, set())]
            new = [s for s in todo if s not in flying.get(key, set())]
            left |= bool(todo)
            if new:
                attrs = {**need.attrs, "seeds": new, "config_hash": key}
                study.enqueue_trial(need.config.params, user_attrs=attrs)
        if not left:
            return
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.optimize(runner, n_trials=1, catch=CATCH, callbacks=list(callbacks))
        else:
            time.sleep(POLL_SECONDS)


def note_changed_family(study: optuna.Study, family: Family) -> None:
    """Rows are a function of the finished tuning trials, which stay as they are once tuning is over; a
    re-run after more tuning (a larger budget, a changed file) chooses them again, and says so."""
    stored = study.user_attrs.get("sequential")
    if stored and stored.get("phase") == family.phase and stored.get("chosen_from") != family.chosen_from:
        console.print(
            f"[yellow]note[/yellow]: the rows were chosen from {len(stored.get('chosen_from') or [])} finished "
            f"tuning trials when the rounds began, now from {len(family.chosen_from)}; they are chosen again"
        )


def run_rounds(
    study: optuna.Study, runner, family: Family, *, close_runs: Callable[[int, str], None], callbacks=()
) -> Progress:
    """Rounds until every row is decided or has ``max`` seeds; the state is recorded after each round."""
    note_changed_family(study, family)
    shown = -1
    while True:
        trials = study.get_trials(deepcopy=False)
        metric = decision_metric(trials)
        progress = replay(family, seed_values(trials, metric), ended_seeds(trials))
        record(study, family, progress, metric)
        if progress.done:
            return progress
        if progress.round != shown:
            announce(family.rows, progress, family.phase)
            shown = progress.round
        train_needs(study, runner, progress.needs, close_runs=close_runs, callbacks=callbacks)


def announce(rows: list[Row], progress: Progress, phase: str) -> None:
    seeds = sorted({s for need in progress.needs for s in need.seeds})
    what = f"{len(progress.needs)} configurations: seeds {_span(seeds)}"
    if progress.round == 0:
        console.print(f"{phase}: training {what}")
        return
    names = ", ".join(rows[i].name for i in progress.undecided)
    console.print(
        f"round {progress.round}: {len(progress.undecided)} of {len(rows)} rows undecided ({names}); "
        f"adding {what}"
    )


def _span(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def record(study: optuna.Study, family: Family, progress: Progress, metric: str) -> dict[str, Any]:
    """The study's user attr ``sequential``: the rows (fixed once), each row's seeds, verdict and why it
    stopped, after the last complete round."""
    from harness.report.sequential import MAX_REACHED

    schedule = family.schedule
    state = {
        "phase": family.phase,
        "metric": metric,
        "min_effect": family.min_effect,
        "schedule": schedule.model_dump(),
        "chosen_from": family.chosen_from,
        "round": progress.round,
        "done": progress.done,
        "rows": [to_dict(r) for r in family.rows],
    }
    for i, tree in enumerate(state["rows"]):
        n = progress.lengths[i]
        tree["seeds"] = schedule.seeds(n)
        result = progress.results[i] if progress.results else None
        if result is None:
            continue
        tree.update({f: _plain(getattr(result, f)) for f in RESULT_FIELDS})
        tree["stopped"] = result.stopped or (MAX_REACHED if n >= schedule.max else None)
    if study.user_attrs.get("sequential") != state:
        study.set_user_attr("sequential", state)
    return state


def _plain(v):
    """JSON-safe: NaN and infinite values (an interval not yet finite) as None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
