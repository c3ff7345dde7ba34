"""ms/image is measured once per architecture: the same student (other weights, other seed) reuses the
figure, another width is measured again, and the measurement runs with a fixed thread count."""

from __future__ import annotations

import torch

from harness.engine import evaluate
from harness.models.unet import UNet


def _counting(monkeypatch) -> list[int]:
    calls = []

    def fake_time(model, x, ctx, warmup, repeats):
        calls.append(torch.get_num_threads())
        return 1.0 + len(calls)

    monkeypatch.setattr(evaluate, "_time", fake_time)
    evaluate.clear_latency_cache()
    return calls


def test_same_architecture_is_measured_once(monkeypatch):
    calls = _counting(monkeypatch)
    x = torch.randn(1, 1, 16, 16)
    torch.manual_seed(0)
    first = evaluate.ms_per_image(UNet(1, 3, width=2, depth=2), x)
    torch.manual_seed(1)  # other weights, same architecture: the cached figure
    again = evaluate.ms_per_image(UNet(1, 3, width=2, depth=2), torch.randn(4, 1, 16, 16))
    assert first == again == 2.0 and len(calls) == 1
    wider = evaluate.ms_per_image(UNet(1, 3, width=4, depth=2), x)
    assert wider == 3.0 and len(calls) == 2
    bigger = evaluate.ms_per_image(UNet(1, 3, width=2, depth=2), torch.randn(1, 1, 32, 32))
    assert bigger == 4.0 and len(calls) == 3  # the input shape is part of the key


def test_measurement_uses_a_fixed_thread_count_and_restores_it(monkeypatch):
    calls = _counting(monkeypatch)
    before = torch.get_num_threads()
    evaluate.ms_per_image(UNet(1, 3, width=2, depth=2), torch.randn(1, 1, 16, 16))
    assert calls == [evaluate.LATENCY_THREADS] and torch.get_num_threads() == before


def test_real_timing_is_positive_and_cached():
    evaluate.clear_latency_cache()
    model, x = UNet(1, 3, width=2, depth=2), torch.randn(1, 1, 16, 16)
    ms = evaluate.ms_per_image(model, x, warmup=1, repeats=3)
    assert ms > 0 and evaluate.ms_per_image(model, x, warmup=1, repeats=3) == ms
