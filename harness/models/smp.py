"""Any segmentation_models_pytorch architecture with any encoder it accepts.

``model: {name: smp, arch: Unet, encoder: resnet18, encoder_weights: null}`` builds
``segmentation_models_pytorch.<arch>`` with the data's input channels and classes. ``encoder`` is any of
``smp.encoders.get_encoder_names()`` (resnet18, mobilenet_v2, efficientnet-b0, ...) or ``tu-<timm model>``.
``encoder_weights: imagenet`` loads the encoder's pretrained weights from the Hugging Face cache (smp and
timm keep them there; timm models without a Hub copy come from the torch hub cache), downloading them only
when they are not cached and the machine is not marked offline (``KD_HARNESS_OFFLINE``/``HF_HUB_OFFLINE``).

The smp model is kept whole as ``net`` (layer names read ``net.encoder.layer1``), like the torchvision
teachers; the wrapper's forward returns logits (N, classes, H, W) at the input's size. H and W must be
divisible by the encoder's output stride (32 at ``encoder_depth: 5``, 8 at depth 3): the wrapper says so in
one line. Logits that come back smaller than the input (PSPNet with a deeper encoder than its upsampling
covers) are resized bilinearly. ``kd_layers`` are found at build time: for each encoder stage the module whose output is that
stage's feature map (``net.encoder.layer1`` .. ``layer4`` for ResNets, ``net.encoder.features.3`` .. for
MobileNetV2, ``net.encoder.model.*`` for ``tu-`` encoders), then ``net.decoder`` (the decoder's output,
before the segmentation head). Stages whose feature is computed outside any module (transformer encoders
such as ``mit_b0``) have no default tap.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from harness.errors import HarnessError
from harness.models.base import MODELS, ModelConfigBase


def architectures() -> dict[str, type]:
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


class SMPConfig(ModelConfigBase):
    name: Literal["smp"] = "smp"
    arch: str = Field(
        "Unet", description="segmentation_models_pytorch architecture: Unet, FPN, DeepLabV3Plus, ..."
    )
    encoder: str = Field("resnet18", description="smp encoder name, or tu-<timm model>")
    encoder_weights: str | None = Field(None, description="pretrained encoder weights, e.g. imagenet")
    encoder_depth: int | None = Field(
        None, ge=1, le=5, description="encoder stages (null: the architecture's default, 5 for most)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="further keyword arguments of the smp architecture"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        archs = architectures()
        by_lower = {a.lower(): a for a in archs}
        if arch.lower() not in by_lower:
            raise ValueError(f"unknown smp architecture {arch!r}; use one of {sorted(archs)}")
        return by_lower[arch.lower()]

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, encoder: str) -> str:
        if encoder.startswith("tu-"):
            import timm

            if not timm.is_model(encoder[3:]):
                raise ValueError(f"{encoder!r}: timm has no model {encoder[3:]!r}; see timm.list_models()")
            return encoder
        from segmentation_models_pytorch.encoders import get_encoder_names

        names = get_encoder_names()
        if encoder not in names:
            close = [n for n in names if n.split("-")[0][:3] == encoder[:3]][:8]
            raise ValueError(
                f"unknown smp encoder {encoder!r} (e.g. {close or names[:8]}); "
                f"see segmentation_models_pytorch.encoders.get_encoder_names() or use tu-<timm model>"
            )
        return encoder

    @model_validator(mode="after")
    def _known_encoder_weights(self):
        if self.encoder_weights is None or self.encoder.startswith("tu-"):
            return self
        from segmentation_models_pytorch.encoders import encoders

        available = list(encoders[self.encoder]["pretrained_settings"])
        if self.encoder_weights not in available:
            raise ValueError(
                f"encoder {self.encoder} has no weights {self.encoder_weights!r}; use one of {available} or null"
            )
        return self


class SMPSegmentation(nn.Module):
    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.stride = int(getattr(net.encoder, "output_stride", 32))
        if not getattr(net, "requires_divisible_input_shape", True):
            self.stride = 1
        self.kd_layers = default_taps(net, in_channels, max(64, 2 * self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(
                f"smp {type(self.net).__name__} needs H and W divisible by {self.stride}, got "
                f"{tuple(x.shape[-2:])}; pad or resize the images, or lower model.encoder_depth"
            )
        out = self.net(x)
        if out.shape[-2:] != x.shape[-2:]:  # e.g. PSPNet with a deeper encoder than its upsampling covers
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


@torch.no_grad()
def default_taps(net: nn.Module, in_channels: int, size: int) -> list[str]:
    """``net.``-prefixed names of the modules that output the encoder's stage features, then the decoder.

    Found by one probe of the encoder: a stage's tap is the last module (in call order) whose output is the
    very tensor the encoder returns for that stage (so ``layer1`` rather than its last block); pass-through
    ``nn.Identity`` modules are skipped.
    """
    encoder = net.encoder
    calls: list[tuple[str, Any]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: calls.append((n, out)))
        for n, m in encoder.named_modules()
        if n and not isinstance(m, nn.Identity)
    ]
    was_training = encoder.training
    encoder.eval()
    try:
        features = encoder(torch.zeros(1, in_channels, size, size))
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    taps = []
    for feat in features[1:]:
        if not isinstance(feat, torch.Tensor) or feat.dim() != 4 or feat.shape[1] == 0:
            continue
        names = [n for n, out in calls if out is feat]
        if names and f"encoder.{names[-1]}" not in taps:
            taps.append(f"encoder.{names[-1]}")
    return [f"net.{t}" for t in taps] + ["net.decoder"]


def encoder_kwargs(cfg: SMPConfig) -> dict[str, Any]:
    """What to pass for the encoder weights: smp's weights name, or for ``tu-`` encoders True plus the
    cached file (so timm reads it without asking the Hub)."""
    from harness.models.weights import encoder_weights_kwargs

    return encoder_weights_kwargs(cfg.encoder, cfg.encoder_weights)


def arch_kwargs(cls: type, cfg: SMPConfig) -> dict[str, Any]:
    """Options for ``cls``; at encoder_depth < 5, a 5-entry default ``decoder_channels`` keeps its last entries."""
    kwargs = dict(cfg.options)
    params = inspect.signature(cls.__init__).parameters
    if cfg.encoder_depth is not None:
        kwargs.setdefault("encoder_depth", cfg.encoder_depth)
    depth = kwargs.get("encoder_depth", params["encoder_depth"].default if "encoder_depth" in params else 5)
    default = params["decoder_channels"].default if "decoder_channels" in params else None
    if isinstance(default, (list, tuple)) and len(default) == 5 and "decoder_channels" not in kwargs:
        kwargs["decoder_channels"] = tuple(default)[5 - depth :]
    return kwargs


@MODELS.register(SMPConfig)
def build_smp(cfg: SMPConfig, in_channels: int, num_classes: int) -> SMPSegmentation:
    cls = architectures()[cfg.arch]
    kwargs = arch_kwargs(cls, cfg)
    try:
        net = cls(
            encoder_name=cfg.encoder,
            in_channels=in_channels,
            classes=num_classes,
            **encoder_kwargs(cfg),
            **kwargs,
        )
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"model smp {cfg.arch}/{cfg.encoder} {kwargs}: {msg}") from None
    return SMPSegmentation(net, in_channels)
