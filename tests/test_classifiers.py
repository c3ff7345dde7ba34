"""Seed 003's classifiers: parameter counts, names, output shapes and feature taps."""

from __future__ import annotations

import pytest
import torch

from harness.models import build_model, count_parameters
from harness.models.classifiers import CifarCNNStudentConfig, CifarCNNTeacherConfig, MLPConfig

# (config, in_channels, input side) -> parameters
PINNED = [
    (MLPConfig(), 1, 28, 2_395_210),  # seed 003 teacher 784-1200-1200-10
    (MLPConfig(hidden=[400]), 1, 28, 318_010),  # seed 003 student 784-400-10
    (CifarCNNTeacherConfig(), 3, 32, 1_256_106),  # Net_teacher, fc1 2048 -> 512
    (CifarCNNStudentConfig(), 3, 32, 161_130),  # Net_student, fc1 1024 -> 128
    (CifarCNNTeacherConfig(input_size=28), 1, 28, 796_778),  # fc1 128*3*3 -> 512
    (CifarCNNStudentConfig(input_size=28), 1, 28, 103_210),  # fc1 64*3*3 -> 128
]


@pytest.mark.parametrize("cfg, channels, side, params", PINNED, ids=lambda v: getattr(v, "name", str(v)))
def test_parameter_counts_are_pinned(cfg, channels, side, params):
    assert count_parameters(build_model(cfg, channels, 10)) == params


def test_cnn_layers_are_named_as_seed_003_prints_them():
    teacher = build_model(CifarCNNTeacherConfig(), 3, 10)
    assert [n for n, _ in teacher.named_children()] == [
        *(f"conv{i}" for i in range(1, 6)),
        "fc1",
        "fc2",
        "fc3",
        *(f"batchnorm{i}" for i in range(1, 6)),
        "pool",
        "dropout",
        "relu",
    ]
    assert (teacher.fc1.in_features, teacher.fc1.out_features, teacher.dropout.p) == (2048, 512, 0.5)
    student = build_model(CifarCNNStudentConfig(), 3, 10)
    assert [n for n, _ in student.named_children()] == [
        "conv1",
        "conv2",
        "conv3",
        "fc1",
        "fc2",
        "pool",
        "dropout",
        "relu",
    ]
    assert (student.fc1.in_features, student.fc1.out_features) == (1024, 128)


def test_mlp_layers_follow_the_seed():
    mlp = build_model(MLPConfig(), 1, 10)
    assert [(m.in_features, m.out_features) for m in (mlp.fc1, mlp.fc2, mlp.fc3)] == [
        (784, 1200),
        (1200, 1200),
        (1200, 10),
    ]
    assert mlp.kd_layers == ["fc1", "fc2"]
    assert build_model(MLPConfig(hidden=[400]), 1, 10).kd_layers == ["fc1"]


CASES = [(1, 28), (3, 32), (1, 8)]
CONFIGS = [
    lambda side: MLPConfig(input_size=side),
    lambda side: MLPConfig(hidden=[400], dropout=0.2, input_size=side),
    lambda side: CifarCNNTeacherConfig(input_size=side),
    lambda side: CifarCNNStudentConfig(input_size=side),
]


@pytest.mark.parametrize("channels, side", CASES)
@pytest.mark.parametrize("make_cfg", CONFIGS)
def test_output_shapes_and_single_fire_taps(make_cfg, channels, side):
    torch.manual_seed(0)
    model = build_model(make_cfg(side), channels, 10)
    modules = dict(model.named_modules())
    fired: dict[str, list[torch.Size]] = {name: [] for name in model.kd_layers}
    for name in model.kd_layers:
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: fired[name].append(out.shape))
    x = torch.rand(4, channels, side, side)
    logits = model(x)
    assert logits.shape == (4, 10)
    assert all(len(shapes) == 1 and shapes[0][0] == 4 for shapes in fired.values()), fired
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_wrong_input_size_names_the_setting():
    model = build_model(CifarCNNStudentConfig(), 3, 10)
    with pytest.raises(ValueError, match="model.input_size"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="model.input_size"):
        build_model(MLPConfig(), 1, 10)(torch.rand(2, 1, 8, 8))


def test_experiment_config_accepts_the_classifiers():
    from harness.config import ExperimentConfig

    for model in (
        {"name": "mlp", "hidden": [400]},
        {"name": "cifar_cnn_teacher"},
        {"name": "cifar_cnn_student", "input_size": 28},
    ):
        cfg = ExperimentConfig(name="t", data={"source": "digits"}, model=model)
        assert cfg.model.name == model["name"]
