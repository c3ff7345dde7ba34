"""Settings that cannot work with 2 classes: ``standardize`` (z-scored 2-class logits are always +-1/sqrt(2))
and ``dist``'s inter-class term (the Pearson correlation of two 2-class distributions is +-1). Why they fail,
measured, and the one-line warning each prints once, at setup (``check_classes``) or on the first batch."""

from __future__ import annotations

import pytest
import torch

from harness.distill import KD_METHODS, base
from harness.distill.response import zscore
from tests.kd_helpers import batch, build_logit_method, rand


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(base, "_WARNED", set())


def warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def kd_grad(method: str, k: int, term: str, **kw) -> float:
    s, t = rand(4, k, 8, 8, seed=1, grad=True), 3 * rand(4, k, 8, 8, seed=2)
    build_logit_method(method, **kw)(batch(s, t))[term].backward()
    return s.grad.abs().max().item()


def test_standardize_with_2_classes_gives_no_gradient_and_warns_once(capsys):
    d = build_logit_method("response", standardize=True)
    d.check_classes(2)  # at setup
    (line,) = warnings(capsys)
    assert line.startswith("warning: kd.method response: standardize with 2 classes gives no gradient")
    assert "set kd.standardize: false" in line
    torch.testing.assert_close(zscore(rand(5, 2)).abs(), torch.full((5, 2), 2**-0.5))
    assert kd_grad("response", 2, "kd", standardize=True) < 1e-2 * kd_grad("response", 2, "kd")
    assert kd_grad("response", 3, "kd", standardize=True) > 0.1 * kd_grad("response", 3, "kd")
    d.check_classes(2)
    assert warnings(capsys) == []  # once per process, though every batch checks


def test_the_first_batch_warns_when_setup_did_not(capsys):
    build_logit_method("response", standardize=True)(batch(rand(2, 2, 4, 4), rand(2, 2, 4, 4)))
    build_logit_method("dist")(batch(rand(2, 2, 4, 4), rand(2, 2, 4, 4)))
    assert [line.split(":")[1] for line in warnings(capsys)] == [" kd.method response", " kd.method dist"]


@pytest.mark.parametrize(
    "method, kw, classes",
    [("response", {"standardize": True}, 3), ("response", {}, 2), ("dist", {"inter_weight": 0.0}, 2)],
)
def test_no_warning_where_the_setting_works(capsys, method, kw, classes):
    d = build_logit_method(method, **kw)
    d.check_classes(classes)
    d(batch(rand(2, classes, 4, 4), rand(2, classes, 4, 4)))
    assert warnings(capsys) == []


def test_dist_inter_term_with_2_classes_only_counts_disagreeing_pixels_and_warns(capsys):
    s, t = rand(4, 2, 8, 8, seed=1, grad=True), 3 * rand(4, 2, 8, 8, seed=2)
    d = build_logit_method("dist")
    capsys.readouterr()
    inter = d(batch(s, t))["inter"]
    disagree = (s.argmax(1) != t.argmax(1)).float().mean()
    torch.testing.assert_close(inter, 2 * disagree, atol=1e-4, rtol=0)  # 1 - mean(+-1)
    assert kd_grad("dist", 2, "inter") < 0.05 * kd_grad("dist", 3, "inter")
    d.check_classes(2)
    (line,) = warnings(capsys)
    assert line.startswith("warning: kd.method dist: with 2 classes the inter-class term is nearly constant")
    assert "kd.inter_weight: 0" in line
    build_logit_method("dist", standardize=True).check_classes(2)
    (line,) = warnings(capsys)  # the inter-class warning was printed already
    assert line.startswith("warning: kd.method dist: standardize with 2 classes gives no gradient")


def test_combo_passes_the_class_count_to_its_methods(capsys):
    combo = KD_METHODS.build(
        KD_METHODS.config_class("combo")(methods={"response": {"standardize": True}, "dist": {}})
    )
    combo.check_classes(2)
    lines = warnings(capsys)
    assert len(lines) == 2 and "response: standardize" in lines[0] and "inter-class" in lines[1]
