"""Shared helpers for the logit-method tests: a method built without feature layers, seeded tensors, a batch."""

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
