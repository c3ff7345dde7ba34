"""The CUDA path: bf16 autocast, channels-last, synchronised ms/image. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kd_training_run_on_cuda_with_bf16(store, tiny_experiment):
    args = [
        "train",
        "--config",
        str(tiny_experiment),
        "--set",
        "kd.method=response",
        "--set",
        "train.device=cuda",
        "--quiet",
    ]
    assert main(args) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny_student").experiment_id])
    assert run.data.tags["device"] == torch.cuda.get_device_name(0)
    assert run.data.params["train.amp"] == "True"
    assert run.data.metrics["ms_per_image"] > 0 and run.data.metrics["train_images_per_s"] > 0


def test_autocast_is_bf16_on_cuda():
    from harness.engine.fit import autocast_factory

    with autocast_factory(torch.device("cuda"), True)():
        out = torch.nn.Linear(4, 4).cuda()(torch.randn(2, 4, device="cuda"))
    assert out.dtype == torch.bfloat16
