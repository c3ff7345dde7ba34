"""What a trial trains, by what it is: the config hash of a trial (seed aside, the teacher named by its
identity) and digests of the files a study's definition names."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from harness.config import ExperimentConfig, read_yaml
from harness.engine.teacher import is_checkpoint, teacher_config
from harness.errors import ConfigError


def config_hash(cfg: ExperimentConfig) -> str:
    """The hash of what a trial trains, seed aside: its resolved config, with the teacher named by what it
    is (and left out when no KD method uses it)."""
    kd = cfg.kd.method != "none"
    teacher = teacher_identity(cfg.teacher) if cfg.teacher and kd else None
    train = cfg.train.model_copy(update={"seed": 0})
    return cfg.model_copy(update={"teacher": teacher, "train": train}).hash()


def teacher_identity(spec: str) -> str:
    """A teacher by what it is, not where it lies: a teacher experiment's config hash (as the teacher is
    found in MLflow), or a checkpoint's content digest."""
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"teacher: file {spec} not found; point it at an experiment file or checkpoint")
    stat = path.stat()
    return _identity(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _identity(path: str, mtime_ns: int, size: int) -> str:
    if not is_checkpoint(path):
        return teacher_config(path).hash()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _experiment_tree(path: str) -> dict[str, Any]:
    return {k: v for k, v in read_yaml(path).items() if k != "name"}


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]
