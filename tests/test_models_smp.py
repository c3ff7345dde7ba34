"""segmentation_models_pytorch models: building, pinned sizes, default taps, input checks, encoder weights,
and a feature KD method between an smp student and an smp teacher on their default taps."""

from __future__ import annotations

import pytest
import torch

from harness.config import build_experiment
from harness.distill import KD_METHODS, KDBatch
from harness.errors import ConfigError, HarnessError
from harness.models import MODELS, build_model, count_parameters
from harness.models.taps import FeatureTap, probe_shapes

SMP = MODELS.config_class("smp")


def smp_model(in_channels: int = 1, num_classes: int = 11, **kw):
    return build_model(SMP(**kw), in_channels, num_classes)


def test_parameter_counts_are_pinned():
    # 1 input channel, 11 classes (the digit canvases); computed once with smp 0.6.0.
    assert count_parameters(smp_model()) == 14_323_387  # Unet / resnet18
    assert count_parameters(smp_model(arch="FPN", encoder="mobilenet_v2")) == 4_216_139


def test_unet_resnet18_default_taps_strides_and_channels():
    net = smp_model()
    assert net.kd_layers == [
        "net.encoder.relu",
        "net.encoder.layer1",
        "net.encoder.layer2",
        "net.encoder.layer3",
        "net.encoder.layer4",
        "net.decoder",
    ]
    x = torch.randn(2, 1, 64, 64)
    shapes = probe_shapes(net, net.kd_layers, x)
    assert {k: tuple(v[1:]) for k, v in shapes.items()} == {
        "net.encoder.relu": (64, 32, 32),  # stride 2
        "net.encoder.layer1": (64, 16, 16),  # 4
        "net.encoder.layer2": (128, 8, 8),  # 8
        "net.encoder.layer3": (256, 4, 4),  # 16
        "net.encoder.layer4": (512, 2, 2),  # 32
        "net.decoder": (16, 64, 64),  # before the 1x1 segmentation head
    }
    assert net(x).shape == (2, 11, 64, 64)


def test_fpn_mobilenet_v2_default_taps():
    net = smp_model(arch="FPN", encoder="mobilenet_v2", num_classes=3)
    shapes = probe_shapes(net, net.kd_layers, torch.randn(1, 1, 64, 64))
    assert {k: tuple(v[1:]) for k, v in shapes.items()} == {
        "net.encoder.features.1": (16, 32, 32),
        "net.encoder.features.3": (24, 16, 16),
        "net.encoder.features.6": (32, 8, 8),
        "net.encoder.features.13": (96, 4, 4),
        "net.encoder.features.18": (1280, 2, 2),
        "net.decoder": (128, 16, 16),
    }


@pytest.mark.parametrize(
    "kw",
    [
        {"arch": "DeepLabV3Plus", "encoder": "efficientnet-b0"},
        {"arch": "PSPNet"},  # upsamples by 8 from an encoder of depth 3
        {"arch": "Linknet", "encoder": "tu-resnet18"},
        {"arch": "unetplusplus", "encoder": "resnet18", "encoder_depth": 3},
    ],
)
def test_other_architectures_give_logits_at_the_input_size(kw):
    net = smp_model(in_channels=3, num_classes=5, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    assert net(x).shape == (2, 5, 64, 64)
    assert len(probe_shapes(net, net.kd_layers, x)) == len(net.kd_layers) >= 4  # every tap is real


def test_encoder_depth_shortens_taps_and_relaxes_the_input_size():
    net = smp_model(encoder_depth=3).eval()
    assert net.kd_layers == ["net.encoder.relu", "net.encoder.layer1", "net.encoder.layer2", "net.decoder"]
    assert net(torch.randn(1, 1, 24, 40)).shape == (1, 11, 24, 40)  # divisible by 8 is enough


def test_input_not_divisible_by_the_output_stride_is_one_line():
    assert smp_model().eval()(torch.randn(1, 1, 28, 28)).shape == (1, 11, 28, 28)  # smp's Unet takes any size
    net = smp_model(arch="FPN").eval()
    with pytest.raises(ValueError, match=r"divisible by 32, got \(28, 28\).*encoder_depth") as exc:
        net(torch.randn(1, 1, 28, 28))
    assert "\n" not in str(exc.value)


def test_unknown_arch_and_encoder_are_one_line_config_errors():
    tree = {"name": "x", "data": {"source": "digits_seg"}, "model": {"name": "smp", "arch": "Unnet"}}
    with pytest.raises(ConfigError) as exc:
        build_experiment(tree, "exp.yaml")
    msg = str(exc.value)
    assert "\n" not in msg and "model.arch" in msg and "'Unnet'" in msg
    assert all(a in msg for a in ("Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "PSPNet", "Linknet"))
    tree["model"] = {"name": "smp", "encoder": "resnet19"}
    with pytest.raises(ConfigError, match="unknown smp encoder 'resnet19'.*resnet18"):
        build_experiment(tree, "exp.yaml")
    tree["model"] = {"name": "smp", "encoder": "tu-no_such_net"}
    with pytest.raises(ConfigError, match="timm has no model 'no_such_net'"):
        build_experiment(tree, "exp.yaml")
    tree["model"] = {"name": "smp", "encoder": "resnet18", "encoder_weights": "instagram"}
    with pytest.raises(ConfigError, match=r"no weights 'instagram'; use one of \['imagenet'"):
        build_experiment(tree, "exp.yaml")


def test_arch_names_are_case_insensitive():
    assert SMP(arch="deeplabv3plus").arch == "DeepLabV3Plus"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("KD_HARNESS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # timm's fallback cache
    return tmp_path / "hf"


def test_uncached_encoder_weights_offline_name_the_repo_and_the_cache(hf_cache):
    with pytest.raises(HarnessError) as exc:
        smp_model(encoder_weights="imagenet")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "smp-hub/resnet18.imagenet" in msg and str(hf_cache) in msg and "model.safetensors" in msg


def test_cached_encoder_weights_load_without_network(hf_cache):
    """A cache laid out as huggingface_hub keeps it (what `hf download` leaves) is used as it is."""
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = hf_cache / "models--smp-hub--resnet18.imagenet" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(1)
    reference = get_encoder("resnet18", in_channels=3)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text("{}")
    net = smp_model(in_channels=3, encoder_weights="imagenet")
    assert torch.equal(net.net.encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_fitnet_and_attention_between_smp_models_on_default_taps():
    """What the engine's build_distiller does: choose the default taps, probe them, set up, one step."""
    torch.manual_seed(0)
    student = smp_model(arch="Unet", encoder="mobilenet_v2", num_classes=4)
    teacher = smp_model(arch="FPN", encoder="resnet18", num_classes=4).eval()
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 4, (2, 64, 64))
    for method in ("fitnet", "attention"):
        kd = KD_METHODS.build(KD_METHODS.config_class(method)(num_layers=2))
        kd.choose_layers(student.kd_layers, teacher.kd_layers)
        assert kd.student_layers == ["net.encoder.features.18", "net.decoder"]
        assert kd.teacher_layers == ["net.encoder.layer4", "net.decoder"]
        kd.setup(probe_shapes(student, kd.student_layers, x), probe_shapes(teacher, kd.teacher_layers, x))
        with torch.no_grad(), FeatureTap(teacher, kd.teacher_layers) as t_tap:
            t_logits = teacher(x)
        with FeatureTap(student, kd.student_layers) as s_tap:
            s_logits = student(x)
        batch = KDBatch(s_logits, y, t_logits, dict(s_tap.features), dict(t_tap.features))
        loss = sum(kd(batch).values())
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        assert student.net.encoder.features[18][0].weight.grad.abs().sum() > 0
        student.zero_grad()


def test_cached_timm_encoder_weights_are_read_from_the_cache_file(hf_cache):
    import timm
    from safetensors.torch import save_file

    revision = "0" * 40
    repo = hf_cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    torch.manual_seed(2)
    reference = timm.create_model("resnet18")
    save_file(reference.state_dict(), repo / "snapshots" / revision / "model.safetensors")
    net = smp_model(in_channels=3, encoder="tu-resnet18.a1_in1k", encoder_weights="imagenet")
    assert torch.equal(net.net.encoder.model.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
    with pytest.raises(
        HarnessError, match="timm/mobilenetv3_small_100.lamb_in1k not in the Hugging Face cache"
    ):
        smp_model(encoder="tu-mobilenetv3_small_100", encoder_weights="imagenet")
