"""``combo``: several KD methods at once (seed 003: Triplet, Triplet + HKD, Triplet + HKD + RKD-DA).

``kd.methods`` maps registered method names to their own config blocks; each sub-method's ``beta`` is its
weight inside the combination, so the trainer's total is

    E = alpha * CE + beta * sum over methods m of beta_m * sum(terms_m)

with ``alpha`` / ``beta`` (and ``regime``, ``schedule``) those of the combo block. Terms are logged as
``train/<method>/<term>`` (``train/triplet/triplet``, ``train/response/kd``, ``train/rkd/rkd_distance``),
already multiplied by beta_m. ``alpha``, ``regime``, ``soft_epochs`` and ``schedule`` belong to the combo
block; setting them inside a sub-method is an error. A sub-method taps its own layers, builds its own
adapters (trained with the student and counted in ``kd_params``) and sees the same batch as the others.

``kd.preset`` names seed 003's combinations, on the network outputs (``source: logits``) as the seed did:

    triplet          {triplet: {source: logits}}
    triplet+hkd      + {response: {}}                  (Hinton KD, temperature 4)
    triplet+hkd+rkd  + {rkd: {source: logits}}         (RKD-DA: distance 25, angle 50)
    hard             {}                                (no KD terms: the hard-label baseline, alpha * CE)

and the segmentation papers' published combinations, as their authors ran them:

    mgd+cwd          {mgd: {}, cwd: {tau: 4, beta: 3}}  (MGD's segmentation setting: MGD on the backbone's
                                                         last stage + CWD on the logits)
    dist             {dist: {tau: 1, inter 1, intra 1}} (DIST's segmentation code: DIST alone, at tau 1)
    cirkd+kd         {cirkd: {}, response: {temperature: 1}}  (CIRKD's terms + pixel KD at T 1, weight 1)
    afdcd+kd         {afdcd: {}, response: {temperature: 1}}  (Af-DCD's terms + pixel KD at T 1, weight 1)

With a preset, ``kd.methods`` may override keys of the preset's methods (``kd.methods.response.temperature:
2``) but not add others. Configs are stored resolved: every sub-method's full settings are in ``methods``,
so they are logged as parameters (``kd.methods.response.temperature``) and enter the config hash.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from harness.distill.base import KD_METHODS, Distiller, KDConfigBase

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "triplet": {"triplet": {"source": "logits"}},
    "triplet+hkd": {"triplet": {"source": "logits"}, "response": {}},
    "triplet+hkd+rkd": {"triplet": {"source": "logits"}, "response": {}, "rkd": {"source": "logits"}},
    "hard": {},
    "mgd+cwd": {"mgd": {}, "cwd": {"source": "logits", "tau": 4.0, "beta": 3.0}},
    "dist": {"dist": {"tau": 1.0, "inter_weight": 1.0, "intra_weight": 1.0}},
    "cirkd+kd": {"cirkd": {}, "response": {"temperature": 1.0, "beta": 1.0}},
    "afdcd+kd": {"afdcd": {}, "response": {"temperature": 1.0, "beta": 1.0}},
}
PresetName = Literal[tuple(PRESETS)]
COMBO_ONLY = ("alpha", "regime", "soft_epochs", "schedule")  # weights of the whole combination
NOT_STORED = ("method", *COMBO_ONLY)


def _fail(detail: str) -> PydanticCustomError:
    # the message goes through the context, so braces in it are not read as placeholders
    return PydanticCustomError("combo_methods", "{detail}", {"detail": detail})


def _describe(name: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(["kd", "methods", name, *(str(p) for p in err["loc"])])
        msg = (
            "unknown key; remove it or check its spelling" if err["type"] == "extra_forbidden" else err["msg"]
        )
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


class ComboConfig(KDConfigBase):
    method: Literal["combo"] = "combo"
    preset: PresetName | None = Field(
        None, description="a published combination (PRESETS); fills (and may be refined by) methods"
    )
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="method name -> its config; its beta weighs it inside the combination",
    )
    _configs: dict[str, KDConfigBase] = PrivateAttr(default_factory=dict)

    @field_validator("methods", mode="before")
    @classmethod
    def _empty_blocks(cls, value):
        # `methods: {triplet: , response: }` in YAML gives None for a method with default settings
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _resolve(self):
        given = {name: dict(sub) for name, sub in self.methods.items()}
        if self.preset is not None:
            chosen = {name: dict(sub) for name, sub in PRESETS[self.preset].items()}
            extra = [name for name in given if name not in chosen]
            if extra:
                have = sorted(chosen) or "no KD method"
                raise _fail(
                    f"kd.methods.{extra[0]}: not part of preset '{self.preset}' (which has {have}); drop it, "
                    "or drop kd.preset and list every method under kd.methods"
                )
            for name, sub in given.items():
                chosen[name].update(sub)
            given = chosen
        elif not given:
            raise _fail(
                "kd.methods: combo needs at least one method, e.g. methods: "
                "{triplet: {source: logits}, response: {}}; or set kd.preset to one of "
                f"{list(PRESETS)}"
            )
        resolved, configs = {}, {}
        for name, sub in given.items():
            if name == "combo":
                raise _fail("kd.methods.combo: a combo cannot hold another combo; list its methods directly")
            if name == "none":
                raise _fail(
                    "kd.methods.none: 'none' adds no KD term; "
                    "leave it out (kd.alpha weighs the hard-label CE)"
                )
            if name not in KD_METHODS.names():
                known = [m for m in KD_METHODS.names() if m not in ("combo", "none")]
                raise _fail(f"kd.methods.{name}: unknown KD method; use one of {known}")
            if sub.get("method", name) != name:
                raise _fail(
                    f"kd.methods.{name}.method: is {sub['method']!r}; drop it (the key names the method)"
                )
            misplaced = [k for k in COMBO_ONLY if k in sub]
            if misplaced:
                raise _fail(
                    f"kd.methods.{name}.{misplaced[0]}: not used inside a combo; set kd.{misplaced[0]} on "
                    f"the combo (kd.methods.{name}.beta weighs {name} within it)"
                )
            try:
                cfg = KD_METHODS.config_class(name).model_validate({**sub, "method": name})
            except ValidationError as exc:
                raise _fail(_describe(name, exc)) from None
            configs[name] = cfg
            resolved[name] = cfg.model_dump(mode="json", exclude=set(NOT_STORED))
        self.methods = resolved
        self._configs = configs
        return self

    def sub_configs(self) -> dict[str, KDConfigBase]:
        return dict(self._configs)


@KD_METHODS.register(ComboConfig)
class ComboKD(Distiller):
    """Delegates to one distiller per sub-method; taps and teacher needs are the union of theirs."""

    def __init__(self, cfg: ComboConfig):
        super().__init__(cfg)
        subs = cfg.sub_configs()
        self.parts = nn.ModuleDict({name: KD_METHODS.build(sub) for name, sub in subs.items()})
        self.weights = {name: sub.beta for name, sub in subs.items()}

    @property
    def uses_teacher_logits(self) -> bool:  # embedding methods decide theirs in choose_layers
        return any(part.uses_teacher_logits for part in self.parts.values())

    def choose_layers(self, student_defaults, teacher_defaults):
        for part in self.parts.values():
            part.choose_layers(student_defaults, teacher_defaults)
        self.student_layers = list(dict.fromkeys(n for p in self.parts.values() for n in p.student_layers))
        self.teacher_layers = list(dict.fromkeys(n for p in self.parts.values() for n in p.teacher_layers))

    def setup(self, student_shapes, teacher_shapes):
        for part in self.parts.values():
            part.setup(student_shapes, teacher_shapes)

    def check_classes(self, num_classes):
        for part in self.parts.values():
            part.check_classes(num_classes)

    def prepare(self, teacher_batches, device):
        out = {}
        for name, part in self.parts.items():
            out.update({f"{name}/{k}": v for k, v in part.prepare(teacher_batches, device).items()})
        return out

    def extra_parameters(self) -> int:
        return sum(part.extra_parameters() for part in self.parts.values())

    def forward(self, batch):
        terms = {}
        for name, part in self.parts.items():
            for term, value in part(batch).items():
                terms[f"{name}/{term}"] = self.weights[name] * value
        return terms
