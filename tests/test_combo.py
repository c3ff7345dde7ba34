"""``combo`` (several KD methods at once, seed 003's rows) and the anchor/positive/negative sampler: terms
against the sub-methods and against the formulas written out, config errors, study overrides into the
nested ``kd.methods``, gradients into student and sub-adapters, and a step on tiny UNets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import apply_overrides, build_experiment, load_experiment
from harness.distill import KD_METHODS, KDBatch
from harness.distill.combo import PRESETS
from harness.distill.triplet import sample_negatives, sample_triplets
from harness.errors import ConfigError
from harness.models.taps import FeatureTap, probe_shapes
from harness.models.unet import UNet
from harness.sweep.config import load_study
from tests.conftest import write_yaml

Combo = KD_METHODS.config_class("combo")
EXPERIMENT = {
    "name": "x",
    "data": {"source": "digits"},
    "model": {"name": "mlp", "hidden": [8], "input_size": 8},
    "teacher": "teacher.yaml",
}


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def combo(**kw):
    d = KD_METHODS.build(Combo(**kw))
    d.choose_layers([], [])
    d.setup({}, {})
    return d


def logits_batch(s, t, targets):
    return KDBatch(student_logits=s, targets=targets, teacher_logits=t)


def _smooth_l1(x):
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


def _rkd_reference(s, t):
    n = len(s)

    def dist(e):
        d = torch.stack([torch.stack([(e[i] - e[j]).norm() for j in range(n)]) for i in range(n)])
        return d / d[d > 0].mean()

    def angle(e):
        a = torch.zeros(n, n, n)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i != j and k != j:
                        u, v = e[i] - e[j], e[k] - e[j]
                        a[i, j, k] = (u @ v) / (u.norm() * v.norm())
        return a

    return 25 * _smooth_l1(dist(s) - dist(t)).mean(), 50 * _smooth_l1(angle(s) - angle(t)).mean()


# --------------------------------------------------------------------------- terms


def test_terms_are_sub_method_terms_times_their_betas():
    cfg = {
        "triplet": {"source": "logits", "beta": 0.5, "margin": 2.0},
        "response": {"temperature": 2.0, "beta": 3.0},
        "rkd": {"source": "logits", "beta": 0.1},
    }
    d = combo(methods=cfg)
    assert d.uses_teacher_logits and d.student_layers == [] and d.teacher_layers == []
    s, t = rand(6, 5, seed=1), rand(6, 5, seed=2) * 3
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.manual_seed(7)  # the triplet's negatives come from torch's global RNG, seeded by the trainer
    out = d(logits_batch(s, t, targets))
    assert list(out) == ["triplet/triplet", "response/kd", "rkd/rkd_distance", "rkd/rkd_angle"]

    for name, sub in cfg.items():  # each method on its own, same inputs, same RNG state
        alone = KD_METHODS.build(
            KD_METHODS.config_class(name)(**{k: v for k, v in sub.items() if k != "beta"})
        )
        alone.choose_layers([], [])
        torch.manual_seed(7)
        for term, value in alone(logits_batch(s, t, targets)).items():
            torch.testing.assert_close(out[f"{name}/{term}"], sub["beta"] * value)

    # ... and against the formulas written out
    torch.manual_seed(7)
    neg = sample_negatives(targets)
    hinge = [
        (2.0 + ((t[a] - s[a]) ** 2).sum() - ((t[a] - s[neg[a]]) ** 2).sum()).clamp(min=0) for a in range(6)
    ]
    torch.testing.assert_close(out["triplet/triplet"], 0.5 * sum(hinge) / 6)
    p_t, p_s = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    hkd = 2**2 * (p_t * (p_t / p_s).log()).sum(1).mean()
    torch.testing.assert_close(out["response/kd"], 3.0 * hkd)
    ref_d, ref_a = _rkd_reference(s, t)
    torch.testing.assert_close(out["rkd/rkd_distance"], 0.1 * ref_d)
    torch.testing.assert_close(out["rkd/rkd_angle"], 0.1 * ref_a)


def test_presets_are_seed_003_rows_on_outputs():
    assert {"triplet", "triplet+hkd", "triplet+hkd+rkd", "hard"} <= set(PRESETS)
    assert list(Combo(preset="triplet+hkd+rkd").methods) == ["triplet", "response", "rkd"]
    for preset in ("triplet", "triplet+hkd", "triplet+hkd+rkd"):
        d = combo(preset=preset)
        assert d.uses_teacher_logits and d.student_layers == []  # on the logits, as seed 003
        assert all(getattr(p.cfg, "source", "logits") == "logits" for p in d.parts.values())
        assert d.extra_parameters() == 0
    hard = combo(preset="hard")
    assert not hard.needs_teacher and hard(logits_batch(rand(4, 3), rand(4, 3), torch.arange(4))) == {}


SEGMENTATION_PRESETS = {  # the published combinations, as each paper's segmentation code runs them
    "mgd+cwd": {
        "mgd": {"beta": 1.0, "mask_ratio": 0.75},
        "cwd": {"beta": 3.0, "tau": 4.0, "source": "logits"},
    },
    "dist": {"dist": {"beta": 1.0, "tau": 1.0, "inter_weight": 1.0, "intra_weight": 1.0}},
    "cirkd+kd": {
        "cirkd": {
            "tau": 0.1,
            "minibatch_weight": 1.0,
            "memory_pixel_weight": 0.1,
            "memory_region_weight": 0.1,
        },
        "response": {"beta": 1.0, "temperature": 1.0, "standardize": False},
    },
    "afdcd+kd": {
        "afdcd": {"tau": 0.07, "fd_weight": 1.0, "ctr_weight": 0.005, "mask_ratio": 0.75},
        "response": {"beta": 1.0, "temperature": 1.0, "standardize": False},
    },
}


def test_published_segmentation_presets_resolve_to_the_papers_settings():
    assert set(Combo.model_fields["preset"].annotation.__args__[0].__args__) == set(PRESETS)  # one list
    for preset, expected in SEGMENTATION_PRESETS.items():
        methods = Combo(preset=preset).methods
        assert list(methods) == list(expected), preset
        for name, settings in expected.items():
            assert {k: methods[name][k] for k in settings} == settings, (preset, name)


def test_segmentation_presets_are_their_methods_summed():
    """Each preset's terms on tiny UNets are the standalone methods' terms times their weights."""
    torch.manual_seed(0)
    student, teacher = UNet(1, 4, width=2, depth=3), UNet(1, 4, width=4, depth=3).eval()
    x = torch.rand(2, 1, 16, 16)
    y = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(1))

    def terms_of(cfg_cls, kw):
        torch.manual_seed(3)  # adapters and memory banks start alike in the combo and alone
        d = KD_METHODS.build(cfg_cls(**kw))
        d.choose_layers(student.kd_layers, teacher.kd_layers)
        d.setup(probe_shapes(student, d.student_layers, x), probe_shapes(teacher, d.teacher_layers, x))
        d.check_classes(4)
        with torch.no_grad(), FeatureTap(teacher, d.teacher_layers) as t_tap:
            t_logits = teacher(x)
        with FeatureTap(student, d.student_layers) as s_tap:
            logits = student(x)
        torch.manual_seed(5)  # masks and memory draws alike
        return d, d(KDBatch(logits, y, t_logits, s_tap.features, t_tap.features))

    for preset, expected in SEGMENTATION_PRESETS.items():
        d, out = terms_of(Combo, {"preset": preset})
        assert {k.split("/")[0] for k in out} == set(expected)
        assert d.extra_parameters() == sum(p.extra_parameters() for p in d.parts.values())
        if len(expected) > 1:
            continue  # several parts draw from one RNG in turn: the single-method presets compare exactly
        (name,) = expected
        sub = {k: v for k, v in Combo(preset=preset).methods[name].items() if k != "beta"}
        _, alone = terms_of(KD_METHODS.config_class(name), sub)
        for term, value in alone.items():
            torch.testing.assert_close(out[f"{name}/{term}"], expected[name]["beta"] * value)
    # mgd+cwd: the cwd part is 3 x CWD at tau 4 on the logits, whatever mgd drew before it
    _, out = terms_of(Combo, {"preset": "mgd+cwd"})
    _, cwd = terms_of(KD_METHODS.config_class("cwd"), {"tau": 4.0})
    torch.testing.assert_close(out["cwd/cwd"], 3.0 * cwd["cwd"])
    assert out["mgd/mgd"] > 0


def test_a_study_names_a_published_combination_in_one_line(tmp_path):
    exp = write_yaml(tmp_path / "exp.yaml", {**EXPERIMENT, "teacher": str(tmp_path / "exp.yaml")})
    study = {
        "experiment": str(exp),
        "objective": {"metric": "val/accuracy"},
        "budget": {"trials": 4},
        "sampler": {"name": "grid"},
        "fixed": {"kd.method": "combo"},
        "search": {"kd.preset": {"choices": list(SEGMENTATION_PRESETS)}},
    }
    loaded = load_study(write_yaml(tmp_path / "s.yaml", study))
    cfg = load_experiment(exp, loaded.overrides({"kd.preset": "cirkd+kd"}))
    assert list(cfg.kd.methods) == ["cirkd", "response"] and cfg.kd.methods["response"]["temperature"] == 1.0


def test_preset_refined_by_methods_and_stored_resolved():
    cfg = Combo(preset="triplet+hkd", methods={"response": {"temperature": 2}})
    subs = cfg.sub_configs()
    assert subs["response"].temperature == 2 and subs["triplet"].source == "logits"
    assert cfg.methods["triplet"]["margin"] == 1.0  # every setting stored, so logged and hashed
    assert "method" not in cfg.methods["response"] and "alpha" not in cfg.methods["response"]
    again = Combo.model_validate(cfg.model_dump(mode="json"))  # checkpoints store the dump
    assert again.model_dump() == cfg.model_dump() and again.sub_configs() == subs
    a = build_experiment({**EXPERIMENT, "kd": cfg.model_dump(mode="json")}, "a")
    b = build_experiment(
        {
            **EXPERIMENT,
            "kd": {"method": "combo", "preset": "triplet+hkd", "methods": {"response": {"temperature": 2.0}}},
        },
        "b",
    )
    assert a.hash() == b.hash()
    assert (
        Combo(methods={"triplet": None, "response": None}).sub_configs()["response"].temperature == 4.0
    )  # `triplet:` in YAML


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "kd, message",
    [
        (
            {"methods": {"response": {"temperature": 0}}},
            "kd.methods.response.temperature: Input should be greater than 0",
        ),
        ({"methods": {"response": {"temprature": 2}}}, "kd.methods.response.temprature: unknown key"),
        ({"methods": {"rkd": {"source": "pixels"}}}, "kd.methods.rkd.source: Input should be"),
        (
            {"methods": {"combo": {"preset": "triplet"}}},
            "kd.methods.combo: a combo cannot hold another combo",
        ),
        ({"methods": {"none": {}}}, "kd.methods.none: 'none' adds no KD term"),
        ({"methods": {"hinton": {}}}, "kd.methods.hinton: unknown KD method; use one of"),
        (
            {"methods": {"response": {"alpha": 0.5}}},
            "kd.methods.response.alpha: not used inside a combo; set kd.alpha",
        ),
        ({"methods": {"response": {"method": "cwd"}}}, "kd.methods.response.method: is 'cwd'"),
        ({}, "kd.methods: combo needs at least one method"),
        (
            {"preset": "triplet", "methods": {"response": {}}},
            "kd.methods.response: not part of preset 'triplet'",
        ),
        ({"preset": "triplet+kd"}, "kd.combo.preset: Input should be"),
    ],
)
def test_bad_sub_config_fails_at_load_with_its_key(tmp_path, kd, message):
    path = write_yaml(tmp_path / "exp.yaml", {**EXPERIMENT, "kd": {"method": "combo", **kd}})
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and len(text.splitlines()) == 1
    if message.startswith("kd.combo.preset"):  # pydantic's own error: the union tag is dropped from the key
        assert "kd.preset: Input should be" in text
    else:
        assert message in text


# --------------------------------------------------------------------------- overrides


def test_dotted_overrides_reach_the_nested_methods(tmp_path):
    base = {**EXPERIMENT, "kd": {"method": "combo", "preset": "triplet+hkd"}}
    tree = apply_overrides(base, {"kd.methods.response.temperature": 4, "kd.methods.triplet.margin": 0.5})
    cfg = build_experiment(tree, "x").kd.sub_configs()
    assert (
        cfg["response"].temperature == 4
        and cfg["triplet"].margin == 0.5
        and cfg["triplet"].source == "logits"
    )

    # as a study sets them: kd.method switched to combo drops the experiment's own kd fields
    path = write_yaml(tmp_path / "exp.yaml", {**EXPERIMENT, "kd": {"method": "response", "temperature": 9}})
    cfg = load_experiment(
        path, {"kd.method": "combo", "kd.methods.response.temperature": 4, "kd.methods.rkd.beta": 0.5}
    )
    assert cfg.kd.method == "combo" and list(cfg.kd.methods) == ["response", "rkd"]
    assert cfg.kd.sub_configs()["response"].temperature == 4 and cfg.kd.sub_configs()["rkd"].beta == 0.5
    assert cfg.flat()["kd.methods.response.temperature"] == 4  # logged as an MLflow param
    back = load_experiment(
        write_yaml(tmp_path / "c.yaml", cfg.model_dump(mode="json")), {"kd.method": "response"}
    )
    assert back.kd.method == "response" and not hasattr(back.kd, "methods")


def test_study_fixes_a_nested_key_and_searches_presets(tmp_path):
    exp = write_yaml(tmp_path / "exp.yaml", {**EXPERIMENT, "teacher": str(tmp_path / "exp.yaml")})
    study = {
        "experiment": str(exp),
        "objective": {"metric": "val/accuracy"},
        "budget": {"trials": 2},
        "sampler": {"name": "grid"},
        "fixed": {"kd.method": "combo", "kd.methods.response.temperature": 2},
        "search": {"kd.preset": {"choices": ["triplet+hkd", "triplet+hkd+rkd"]}},
    }
    loaded = load_study(write_yaml(tmp_path / "ok.yaml", study))
    cfg = load_experiment(exp, loaded.overrides({"kd.preset": "triplet+hkd+rkd"}))
    assert cfg.kd.sub_configs()["response"].temperature == 2 and list(cfg.kd.methods) == [
        "triplet",
        "response",
        "rkd",
    ]
    study["search"]["kd.preset"]["choices"].append("triplet")  # a preset without response: named at load time
    with pytest.raises(ConfigError, match=r"kd.methods.response: not part of preset 'triplet'.*kd.preset"):
        load_study(write_yaml(tmp_path / "bad.yaml", study))


# --------------------------------------------------------------------------- gradients and layers


def test_gradients_reach_student_and_every_sub_adapter():
    s1, s2 = rand(4, 3, 4, 4, seed=1, grad=True), rand(4, 5, seed=2, grad=True)
    t1, t2 = rand(4, 6, 4, 4, seed=3, grad=True), rand(4, 7, seed=4, grad=True)
    d = KD_METHODS.build(
        Combo(
            methods={
                "fitnet": {"student_layers": ["s1"], "teacher_layers": ["t1"]},
                "triplet": {"student_layers": ["s2"], "teacher_layers": ["t2"], "beta": 0.5},
                "rkd": {"student_layers": ["s1"], "teacher_layers": ["t1"]},
            }
        )
    )
    d.choose_layers([], [])
    assert d.student_layers == ["s1", "s2"] and d.teacher_layers == ["t1", "t2"]  # the union, in order
    assert d.needs_teacher and not d.uses_teacher_logits
    d.setup({"s1": s1.shape, "s2": s2.shape}, {"t1": t1.shape, "t2": t2.shape})
    trainable = [p for p in d.parameters() if p.requires_grad]  # what the trainer hands the optimizer
    sub_params = [p for part in d.parts.values() for p in part.parameters()]
    assert {id(p) for p in trainable} == {id(p) for p in sub_params} and trainable
    assert (
        d.extra_parameters() == sum(p.numel() for p in sub_params) == (3 * 6 + 2 * 6) + (5 * 7 + 7)
    )  # conv+BN, linear
    d.train()
    terms = d(
        KDBatch(
            torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), None, {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}
        )
    )
    assert set(terms) == {"fitnet/hint", "triplet/triplet", "rkd/rkd_distance", "rkd/rkd_angle"}
    sum(terms.values()).backward()
    for x in (s1, s2):
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None
    for p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_step_on_tiny_unets_with_prepare_delegated():
    torch.manual_seed(0)
    student, teacher = UNet(1, 11, width=2, depth=3), UNet(1, 11, width=4, depth=3).eval()
    teacher.requires_grad_(False)
    x = torch.rand(4, 1, 16, 16)
    y = torch.zeros(4, 16, 16, dtype=torch.long)
    for i in range(4):
        y[i, 4:12, 4:12] = i + 1
    d = KD_METHODS.build(Combo(methods={"adaptation": {}, "response": {"beta": 0.5}, "triplet": {}}))
    d.choose_layers(student.kd_layers, teacher.kd_layers)
    assert d.student_layers == student.kd_layers[-1:] and d.teacher_layers == teacher.kd_layers[-1:]
    d.setup(probe_shapes(student, d.student_layers, x[:2]), probe_shapes(teacher, d.teacher_layers, x[:2]))

    def teacher_outputs():
        with torch.no_grad(), FeatureTap(teacher, d.teacher_layers) as tap:
            return teacher(x), dict(tap.features)

    def teacher_batches():
        for _ in range(2):
            logits, feats = teacher_outputs()
            yield KDBatch(torch.empty(0), y, logits, {}, feats)

    metrics = d.prepare(teacher_batches, torch.device("cpu"))
    assert metrics and all(k.startswith("adaptation/ae/") and math.isfinite(v) for k, v in metrics.items())
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam(
        list(student.parameters()) + [p for p in d.parameters() if p.requires_grad], lr=1e-2
    )
    t_logits, t_feats = teacher_outputs()
    student.train()
    d.train()
    with FeatureTap(student, d.student_layers) as tap:
        logits = student(x)
    terms = d(KDBatch(logits, y, t_logits, tap.features, t_feats))
    assert {k.split("/")[0] for k in terms} == {"adaptation", "response", "triplet"}
    loss = F.cross_entropy(logits, y) + sum(terms.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
    assert isinstance(d.parts, nn.ModuleDict)


# ------------------------------------------------------------------- anchor / positive / negative sampler


def test_sample_triplets_anchor_positive_share_a_class_negative_does_not():
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(0))
    labels[0] = 9  # a class of one: no positive, so never an anchor
    for seed in range(5):
        a, p, n = sample_triplets(labels, torch.Generator().manual_seed(seed))
        assert len(a) == len(p) == len(n) == 39 and a.dtype == torch.long
        assert torch.equal(a, torch.arange(1, 40))  # one triplet per usable sample
        assert (labels[a] == labels[p]).all() and (a != p).all()
        assert (labels[a] != labels[n]).all()
    again = sample_triplets(labels, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip((a, p, n), again))
    # positives and negatives are drawn among all candidates, not always the first one
    draws = [
        sample_triplets(torch.tensor([0, 0, 0, 1, 2]), torch.Generator().manual_seed(s)) for s in range(50)
    ]
    assert {int(d[1][0]) for d in draws} == {1, 2} and {int(d[2][0]) for d in draws} == {3, 4}


def test_sample_triplets_edge_cases_and_masks():
    a, p, n = sample_triplets(torch.tensor([3, 3, 3]))  # no other class
    assert a.numel() == p.numel() == n.numel() == 0
    a, p, n = sample_triplets(torch.tensor([0, 1, 2]))  # no positive
    assert a.numel() == 0
    masks = torch.full((4, 4, 4), 255, dtype=torch.long)
    masks[0, :2], masks[1, 1:3], masks[2, 0] = (
        3,
        3,
        5,
    )  # images 0, 1 of class 3, image 2 of 5, image 3 unlabelled
    a, p, n = sample_triplets(masks, torch.Generator().manual_seed(0))
    assert a.tolist() == [0, 1] and p.tolist() == [1, 0] and n.tolist() == [2, 2]
