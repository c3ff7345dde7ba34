"""Experiment files: validated pydantic models, dotted-key overrides, and one-line error messages.

An experiment file is a fixed, named recipe: data + model + training + (optionally) a teacher and a kd
block. Studies reuse experiments and override keys such as ``model.width`` or ``kd.temperature``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.data import DATA
from harness.distill import KD_METHODS
from harness.errors import ConfigError
from harness.models import MODELS

# Blocks chosen by a discriminator key; changing the discriminator through an override drops the old
# choice's own fields (a study that switches kd.method from response to cwd must not carry temperature).
DISCRIMINATED_BLOCKS = {"data": DATA, "model": MODELS, "kd": KD_METHODS}


class BudgetConfig(BaseModel):
    """A compute budget that ends training when spent; ``train.epochs`` stays the upper bound."""

    model_config = ConfigDict(extra="forbid")
    flops: float | None = Field(None, gt=0, description="training FLOPs (docs: README, Equal compute)")
    seconds: float | None = Field(None, gt=0, description="wall seconds of training steps")

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.flops is None) == (self.seconds is None):
            raise ValueError("give exactly one of flops or seconds, e.g. {flops: 2.0e12}")
        return self


# Validation metrics that can choose the best epoch (train.select_on); those ending in "loss" are minimised.
SELECTABLE = ("val/miou", "val/pixel_acc", "val/accuracy", "val/loss")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(8, ge=0, description="0: evaluate the given model.weights as they are, no training")
    iterations: int | None = Field(
        None,
        ge=1,
        description="train exactly this many optimizer steps (epochs: as many passes as that takes, the last "
        "one partial); train.epochs is then not used",
    )
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="images per evaluation batch (val and test); unset: max(batch_size, 64). Lower it when "
        "full-resolution evaluation does not fit (Cityscapes 1024x2048)",
    )
    lr: float = Field(3e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["none", "cosine", "step", "plateau", "poly"] = "none"
    power: float = Field(0.9, gt=0, description="poly scheduler: lr0 * (1 - step / steps) ** power, per step")
    step_size: int = Field(25, ge=1, description="step scheduler: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step/plateau scheduler: decay factor")
    class_weights: Literal["none", "inverse_freq"] | list[float] = "none"
    budget: BudgetConfig | None = Field(None, description="end training when this compute is spent")
    early_stopping: int | None = Field(
        None, ge=1, description="stop after this many epochs without val improvement"
    )
    select_on: str | None = Field(
        None,
        description="val metric for the best epoch, early stopping and plateau; None: the task's quality metric",
    )
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = True
    compile: bool = False
    teacher_cache: bool = Field(True, description="compute the teacher's outputs once when inputs are fixed")
    teacher_cache_gb: float = Field(4.0, gt=0, description="largest teacher cache to keep on the device")
    teacher_views: int = Field(
        0,
        ge=0,
        description="with random data.augment: draw this many views per training image once, store the "
        "teacher's outputs on each, and train every epoch on one stored view per image (0: live teacher)",
    )
    teacher_views_topk: int | None = Field(
        None, ge=1, description="store only the k largest teacher logits per pixel (rest: spread mass)"
    )
    teacher_views_seed: int = Field(0, description="seed of the stored views (shared by a study's trials)")
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-steps per optimizer step: train.batch_size (the global batch, all processes "
        "together) is split over the processes (torchrun) and then into this many micro-batches",
    )
    sync_bn: bool = Field(
        False, description="several processes (torchrun): batch norm statistics over all of them (CUDA only)"
    )

    @field_validator("select_on")
    @classmethod
    def _selectable(cls, v: str | None) -> str | None:
        if v is not None and v not in SELECTABLE:
            raise ValueError(f"unknown metric {v!r}; use one of {list(SELECTABLE)}")
        return v

    @model_validator(mode="after")
    def _iterations_train(self):
        if self.iterations is not None and self.epochs == 0:
            raise ValueError(
                "train.iterations trains but train.epochs 0 evaluates the given weights untrained; "
                "remove one of them"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler):
        # Fields added after configs were first hashed are left out at their defaults: hashes stay.
        data = handler(self)
        if isinstance(data, dict):
            if data.get("iterations") is None:
                data.pop("iterations", None)
            if data.get("scheduler") != "poly" and data.get("power") == 0.9:
                data.pop("power", None)
            for key, off in (
                ("teacher_views", 0),
                ("teacher_views_topk", None),
                ("teacher_views_seed", 0),
                ("grad_accum", 1),
                ("sync_bn", False),
                ("eval_batch_size", None),
            ):
                if data.get(key, off) == off:
                    data.pop(key, None)
        return data


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    data: DATA.union()  # type: ignore[valid-type]
    model: MODELS.union()  # type: ignore[valid-type]
    train: TrainConfig = Field(default_factory=TrainConfig)
    kd: KD_METHODS.union() = Field(default_factory=lambda: KD_METHODS.config_class("none")())  # type: ignore[valid-type]
    teacher: str | None = Field(None, description="experiment file or checkpoint (.pt) of the teacher")

    @model_validator(mode="after")
    def _teacher_for_kd(self):
        if self.kd.method != "none" and self.teacher is None:
            raise ValueError(
                f"kd.method '{self.kd.method}' needs a teacher: set 'teacher' to an experiment file or checkpoint"
            )
        return self

    def hash(self) -> str:
        """Stable digest of everything that determines the trained weights (not the run's name)."""
        payload = self.model_dump(mode="json", exclude={"name"})
        payload["train"].pop("device", None)
        for key in ("budget", "select_on"):  # runs from before these existed keep their hash (teachers)
            if payload["train"].get(key, 0) is None:
                del payload["train"][key]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: file not found; check the path (experiments live in experiments/, studies in studies/)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); give a YAML file saved as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``kd.temperature``) in a copy of a config tree."""
    tree = copy.deepcopy(tree)
    for block, registry in DISCRIMINATED_BLOCKS.items():
        new_choice = overrides.get(f"{block}.{registry.key}")
        current = tree.get(block) or {}
        if new_choice is not None and isinstance(current, dict) and current.get(registry.key) != new_choice:
            common = set(KD_METHODS.config_class("none").model_fields) if block == "kd" else set()
            tree[block] = {k: v for k, v in current.items() if k in common}
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return tree


def describe_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: file, dotted key, what is wrong and how to fix it."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        key = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required key is missing; add it"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = f"unknown choice {ctx.get('tag')!r}; use one of {ctx.get('expected_tags')}"
        elif err["type"] == "union_tag_not_found":
            msg = f"missing '{err.get('ctx', {}).get('discriminator', '').strip(chr(39))}' naming which one to use"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (
        part in DATA.names() or part in MODELS.names() or part in KD_METHODS.names()
    )


def build_experiment(tree: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc)) from None


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    tree = read_yaml(path)
    tree.setdefault("name", Path(path).stem)
    return build_experiment(apply_overrides(tree, overrides or {}), str(path))
