"""Shared helpers for the KD method tests: methods built without a model (logit methods, or one tapped
feature layer each side), seeded tensors, batches."""

from __future__ import annotations

import torch

from harness.distill import KD_METHODS, KDBatch


def build_logit_method(method: str, **kw):
    d = KD_METHODS.build(KD_METHODS.config_class(method)(**kw))
    d.choose_layers(["a"], ["b"])
    d.setup({}, {})
    return d


def rand(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def batch(s, t):
    return KDBatch(student_logits=s, targets=torch.zeros(len(s), dtype=torch.long), teacher_logits=t)


def build_feature_method(method: str, s_shape=None, t_shape=None, **kw):
    """``method`` tapping one student layer "s" and one teacher layer "t" (set up when shapes are given)."""
    d = KD_METHODS.build(KD_METHODS.config_class(method)(student_layers=["s"], teacher_layers=["t"], **kw))
    d.choose_layers([], [])
    if s_shape is not None:
        d.setup({"s": torch.Size(s_shape)}, {"t": torch.Size(t_shape)})
    return d


def feature_batch(s, t):
    """A batch carrying only the tapped features "s" (student) and "t" (teacher)."""
    return KDBatch(torch.zeros(len(s), 3), torch.arange(len(s)), None, {"s": s}, {"t": t})


def count_teacher_forwards(monkeypatch) -> list[int]:
    """Patch the teacher loader so that each forward of a loaded teacher appends its batch size to the list
    returned (how tests check that replayed views run no teacher while training)."""
    from harness.engine import teacher as teacher_module

    calls: list[int] = []
    real = teacher_module.load_checkpoint

    def counted(*args, **kw):
        model, payload = real(*args, **kw)
        model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        return model, payload

    monkeypatch.setattr(teacher_module, "load_checkpoint", counted)
    return calls


def fresh_view_stores(tmp_path, monkeypatch) -> None:
    """Replayed-view tests start from nothing stored: views under ``tmp_path``, no store kept in memory, no
    one-line fallback warning already given."""
    import harness.distill.base as base
    from harness.engine import views

    monkeypatch.setenv("HARNESS_VIEWS_DIR", str(tmp_path / "views"))
    monkeypatch.setattr(views, "_STORES", {})
    monkeypatch.setattr(base, "_WARNED", set())
