"""What a study file may change under a study already stored: the objective and constraints (refused), a
categorical's choices (refused: Optuna cannot change them within a study), and everything else (announced
in one line, see ``definition_changes``)."""

from __future__ import annotations

from typing import Any

from harness.errors import ConfigError
from harness.sweep.config import StudyConfig


def check_judged_alike(name: str, found, definition: dict[str, Any], trials: int) -> None:
    """Earlier trials were judged on the stored objective and constraints: a file that changes them cannot
    resume the study (Optuna would keep the stored direction, and trials' feasibility would be stale)."""
    old = found.user_attrs.get("definition") or {}  # none stored: a study from before definitions
    direction = found.directions[0].name.lower()
    metric = definition["objective"]["metric"]
    before = {
        "objective": old.get("objective", {"metric": metric, "direction": direction}),
        "constraints": old.get("constraints", definition["constraints"]),
    }
    after = {k: definition[k] for k in before}
    if before == after:
        return
    key = "objective" if before["objective"] != after["objective"] else "constraints"

    def show(d):
        o = d["objective"]
        return f"{o['direction']} {o['metric']}" if key == "objective" else f"constraints {d['constraints']}"

    raise ConfigError(
        f"study {name}: its {trials} earlier trials were judged on {show(before)}, this file asks for "
        f"{show(after)}; keep the old one, or start a new study with --study-name NEW (or name: in the file)"
    )


def check_choices_kept(study: StudyConfig, trials) -> None:
    """Optuna cannot change a categorical's choices within one study ("dynamic value space"): refuse a file
    that does, before anything runs, instead of failing inside a trial."""
    for t in trials:
        for key, dist in t.distributions.items():
            p = study.search.get(key)
            if p is not None and p.kind == "categorical" and tuple(p.choices) != tuple(dist.choices):
                raise ConfigError(
                    f"study {study.name}: {key} choices {list(dist.choices)} -> {list(p.choices)}, and Optuna "
                    "cannot change a study's choices; keep the old ones, or start a new study with "
                    "--study-name NEW (or name: in the file)"
                )


def definition_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two stored definitions (objective and constraints aside), one phrase each."""
    out = []
    for key in ("experiment", "teacher"):
        before, after = old.get(key) or {}, new.get(key) or {}
        if before.get("file") != after.get("file"):
            out.append(f"{key} {before.get('file')} -> {after.get('file')}")
        elif before != after:
            out.append(f"{key} {after.get('file')} edited")
    for key in ("seeds", "min_effect", "arms", "confirm"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    before, after = old.get("fixed") or {}, new["fixed"]
    for k in sorted(set(before) | set(after), key=list({**before, **after}).index):
        if before.get(k, ...) != after.get(k, ...):
            out.append(f"fixed {k}: {before.get(k, '(unset)')} -> {after.get(k, '(unset)')}")
    before, after = old.get("search") or {}, new["search"]
    for k in [*after, *(k for k in before if k not in after)]:
        if before.get(k) != after.get(k):
            what = "added" if k not in before else "removed" if k not in after else "changed"
            out.append(f"search {k} {what}")
    return out
