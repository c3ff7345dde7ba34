"""model.weights: plain state dicts (.pt/.pth/.safetensors) on any model, torchvision weights names from the
torch hub cache, and the one-line errors when they do not fit or are not there. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from harness.models import MODELS, build_model

SMP = {"name": "smp", "arch": "FPN", "encoder": "resnet18"}


def make(cfg: dict, in_channels: int = 1, num_classes: int = 3, **kw):
    return build_model(MODELS.config_class(cfg["name"])(**{**cfg, **kw}), in_channels, num_classes)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_HARNESS_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_state_dict_round_trip_gives_identical_outputs(tmp_path, suffix):
    torch.manual_seed(0)
    source = make(SMP)
    path = save(source.state_dict(), tmp_path / f"weights{suffix}")
    torch.manual_seed(1)
    assert not torch.equal(make(SMP).net.encoder.conv1.weight, source.net.encoder.conv1.weight)
    loaded = make(SMP, weights=str(path))
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(outputs(loaded, x), outputs(source, x))


@pytest.mark.parametrize("how", ["bare", "dataparallel", "harness_payload", "no_batch_counts"])
def test_state_dicts_of_the_bare_network_and_common_wrappings_load(tmp_path, how):
    torch.manual_seed(0)
    source = make({"name": "unet", "width": 2, "depth": 3})
    smp_source = make(SMP)
    state = {
        "bare": smp_source.net.state_dict(),  # torch.save(smp_model.state_dict()) of the smp model itself
        "dataparallel": {f"module.{k}": v for k, v in smp_source.state_dict().items()},
        "harness_payload": {"config": {}, "state_dict": smp_source.state_dict()},
        "no_batch_counts": {k: v for k, v in smp_source.state_dict().items() if "num_batches" not in k},
    }[how]
    loaded = make(SMP, weights=str(save(state, tmp_path / "w.pt")))
    x = torch.randn(1, 1, 64, 64)
    assert torch.equal(outputs(loaded, x), outputs(smp_source, x))
    # and the k-UNet, which has no wrapper prefix
    unet = make(
        {"name": "unet", "width": 2, "depth": 3}, weights=str(save(source.state_dict(), tmp_path / "u.pt"))
    )
    assert torch.equal(outputs(unet, torch.ones(1, 1, 16, 16)), outputs(source, torch.ones(1, 1, 16, 16)))


def test_renamed_key_is_one_line_naming_both_keys(tmp_path):
    state = make(SMP).state_dict()
    state["net.encoder.conv1.weights"] = state.pop("net.encoder.conv1.weight")
    path = save(state, tmp_path / "renamed.pt")
    with pytest.raises(HarnessError) as exc:
        make(SMP, weights=str(path))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert "1 missing key(s) (first: net.encoder.conv1.weight)" in msg
    assert "1 unexpected key(s) (first: net.encoder.conv1.weights)" in msg


def test_other_classes_is_a_shape_mismatch(tmp_path):
    path = save(make(SMP, num_classes=21).state_dict(), tmp_path / "voc.safetensors")
    with pytest.raises(
        HarnessError, match=r"2 shape mismatch\(es\) \(first: net.segmentation_head.0.weight, file \(21,"
    ):
        make(SMP, weights=str(path))


def test_missing_file_and_unreadable_file_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match=r"model.weights: .*nope.pt not found"):
        make(SMP, weights=str(tmp_path / "nope.pt"))
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)  # a pickled module, not a state dict
    with pytest.raises(
        HarnessError, match=r"not a plain state dict .*torch.save\(model.state_dict\(\)"
    ) as exc:
        make(SMP, weights=str(whole))
    assert "\n" not in str(exc.value)


def test_weights_names_are_only_for_torchvision_models():
    with pytest.raises(HarnessError, match="'DEFAULT': no such file.*only for the torchvision models"):
        make(SMP, weights="DEFAULT")


def test_unset_weights_stay_out_of_config_dumps():
    """So the config hashes of existing experiments (teachers found again by hash) do not change."""
    cfg = MODELS.config_class("unet")()
    assert "weights" not in cfg.model_dump()
    assert MODELS.config_class("unet")(weights="w.pt").model_dump()["weights"] == "w.pt"


# ---------------------------------------------------------------- torchvision weights names

TV = {"name": "deeplabv3_mobilenet_v3_large"}


def test_uncached_torchvision_weights_name_the_file_and_the_folder(tmp_path):
    with pytest.raises(HarnessError) as exc:
        make(TV, weights="DEFAULT")
    msg = str(exc.value)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "\n" not in msg
    assert "deeplabv3_mobilenet_v3_large-fc3c493d.pth is not in " + str(folder) in msg
    assert "https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth" in msg
    assert not folder.exists() or not any(folder.iterdir())  # nothing was downloaded


def test_unknown_torchvision_weights_name_lists_the_choices():
    with pytest.raises(
        HarnessError, match=r"not a weights name of .*\['DEFAULT', 'COCO_WITH_VOC_LABELS_V1'\]"
    ):
        make(TV, weights="IMAGENET1K_V1")


def test_cached_torchvision_weights_load_with_head_and_input_adapted(tmp_path, capsys):
    """The cached file (here: random weights in torchvision's layout, 21 classes, aux head, RGB) loads into an
    11-class, 1-channel model: everything but the final classifier conv, first conv summed over RGB."""
    from torchvision.models import segmentation

    torch.manual_seed(0)
    reference = segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / "deeplabv3_mobilenet_v3_large-fc3c493d.pth")
    torch.manual_seed(1)
    fresh = make(TV, in_channels=1, num_classes=11)
    torch.manual_seed(1)
    model = make(TV, in_channels=1, num_classes=11, weights="COCO_WITH_VOC_LABELS_V1")
    ref = reference.state_dict()
    got = model.state_dict()
    assert torch.equal(got["net.backbone.5.block.0.0.weight"], ref["backbone.5.block.0.0.weight"])
    assert torch.equal(got["net.classifier.0.convs.0.0.weight"], ref["classifier.0.convs.0.0.weight"])
    assert torch.equal(got["net.classifier.4.weight"], fresh.state_dict()["net.classifier.4.weight"])
    assert torch.allclose(got["net.backbone.0.0.weight"], ref["backbone.0.0.weight"].sum(1, keepdim=True))
    out = capsys.readouterr().out
    assert (
        "trained for 21 classes, the data has 11: "
        "loaded everything but the final classifier conv net.classifier.4" in out
    )
    assert "adapted net.backbone.0.0 from 3 to 1 input channels" in out
