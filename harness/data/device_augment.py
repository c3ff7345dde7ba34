"""Random augmentation of in-memory splits (digits_seg, microscopy) on the training device, in batches.

The parameters are those of :mod:`harness.data.transforms` (``draw_params``: scale, crop box, flip), drawn per
sample on the host from a seeded generator; only applying them is batched here. A view's parameters are held
as one row of ints, ``(size_h, size_w, top, left, crop_h, crop_w, flip)`` (``pack``/``unpack``), so a run can
store them (``train.teacher_views``) and re-apply them later: ``apply_views`` gives the same tensors for the
same rows every time. Scaling uses bilinear sampling at pixel centres (align_corners false, edges clamped; no
antialiasing when shrinking) for images and nearest at pixel centres for masks (as ``resize_mask``); where a
crop box extends past the scaled image, images get ``augment.pad`` and masks the ignore index. Without a
scale the views are pure crops and flips (exact indexing).

``data.augment`` on an in-memory source takes ``scale``, ``scale_step``, ``crop``, ``crop_eval``, ``pad`` and
``hflip``; val and test are centre-cropped once at load (``crop_eval``). ``resize``, ``color_jitter`` and
``normalize`` are refused (the data is already one size; use ``data.normalize``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from harness.data.base import IGNORE_INDEX, DataSplits, TensorSplit
from harness.data.transforms import AugmentConfig, AugmentParams, draw_params, eval_params

FIELDS = ("size_h", "size_w", "top", "left", "crop_h", "crop_w", "flip")


class TensorAugmentConfig(AugmentConfig):
    """``data.augment`` of an in-memory source: random scale, crop and flip, applied on the device."""

    @model_validator(mode="after")
    def _in_memory(self):
        refused = {
            "resize": self.resize is not None,
            "color_jitter": self.color_jitter > 0,
            "normalize": self.normalize,
        }
        bad = [k for k, on in refused.items() if on]
        if bad:
            raise ValueError(
                f"in-memory sources take scale, crop, hflip and pad; remove {bad} (their images are one size "
                "already; for input statistics use data.normalize)"
            )
        if isinstance(self.pad, list) and len(self.pad) != 1:
            raise ValueError("in-memory sources have one channel here; give pad as one value")
        return self


def augment_field():
    """The ``augment`` field of an in-memory source: left out of dumps when unset, so hashes stay."""
    return Field(
        None,
        exclude_if=lambda v: v is None,
        description="random scale/crop/flip of training images on the device (data/device_augment.py)",
    )


def pack(params: list[AugmentParams]) -> torch.Tensor:
    """(n, 7) int64 rows of :data:`FIELDS`."""
    return torch.tensor([[*p.size, *p.box[:2], *p.box[2:], int(p.flip)] for p in params], dtype=torch.long)


def unpack(row) -> AugmentParams:
    h, w, top, left, ch, cw, flip = (int(v) for v in row)
    return AugmentParams((h, w), (top, left, ch, cw), bool(flip))


def draw_rows(cfg: AugmentConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Parameters of ``n`` random views of images of ``size``, drawn in order from ``generator``."""
    return pack([draw_params(cfg, size, generator, in_channels=1) for _ in range(n)])


def _axis(start: torch.Tensor, length: int, flip: torch.Tensor, scaled: torch.Tensor, n: int):
    """Per view, along one axis of the crop: the position in the scaled image of each output pixel (mirrored
    where ``flip``), its source index (nearest at pixel centres), its bilinear source coordinate normalised to
    [-1, 1] (align_corners false) and whether it lies inside the scaled image."""
    ar = torch.arange(length, device=start.device)
    pos = start[:, None] + torch.where(flip[:, None], ar.flip(0)[None], ar[None])
    size = scaled[:, None].double()
    inside = (pos >= 0) & (pos < scaled[:, None])
    src = ((pos.double() + 0.5) * (n / size)).long().clamp(0, n - 1)
    return src, ((2 * pos.double() + 1) / size - 1).float(), inside


def apply_views(
    images: torch.Tensor,
    masks: torch.Tensor,
    rows: torch.Tensor,
    pad: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The views ``rows`` (n, 7) of ``images`` (n, C, H, W) and ``masks`` (n, H, W), on their device. Every
    row must have the same crop size (a batch stacks)."""
    n, c, h, w = images.shape
    rows = rows.to(images.device)
    ch, cw = int(rows[0, 4]), int(rows[0, 5])
    if bool((rows[:, 4] != ch).any() | (rows[:, 5] != cw).any()):
        raise ValueError("views of one batch must share their crop size")
    flip = rows[:, 6].bool()
    ry, gy, in_y = _axis(rows[:, 2], ch, torch.zeros_like(flip), rows[:, 0], h)
    rx, gx, in_x = _axis(rows[:, 3], cw, flip, rows[:, 1], w)
    b = torch.arange(n, device=images.device)[:, None, None]
    inside = in_y[:, :, None] & in_x[:, None, :]
    y = masks[b, ry[:, :, None], rx[:, None, :]]
    if bool((rows[:, 0] == h).all() & (rows[:, 1] == w).all()):
        x = images.permute(0, 2, 3, 1)[b, ry[:, :, None], rx[:, None, :]].permute(0, 3, 1, 2)
    else:
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    fill = torch.as_tensor(pad[0] if isinstance(pad, list) else pad, dtype=images.dtype, device=images.device)
    x = torch.where(inside[:, None], x, fill)
    y = torch.where(inside, y, torch.as_tensor(ignore_index, dtype=masks.dtype, device=masks.device))
    return x.contiguous(), y.contiguous()


class DeviceAugmentSplit(Dataset):
    """A training TensorSplit whose every pass (``iterate_batches``) shows fresh random views, drawn from the
    trainer's generator; an unshuffled pass and ``split[i]`` show the eval view (centre crop or whole)."""

    def __init__(self, base: TensorSplit, cfg: AugmentConfig, ignore_index: int = IGNORE_INDEX):
        self.base, self.cfg, self.ignore_index = base, cfg, ignore_index
        self.size = tuple(base.images.shape[-2:])
        self.eval_row = pack([eval_params(cfg, self.size)])[0]

    deterministic = False

    def __len__(self) -> int:
        return len(self.base)

    def views(self, idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.base.images.device)
        return apply_views(
            self.base.images[idx], self.base.targets[idx], rows, self.cfg.pad, self.ignore_index
        )

    def draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return draw_rows(self.cfg, n, self.size, generator)

    def pass_rows(self, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
        """The view of every sample in one pass: random when shuffled (training), else the eval view."""
        if not shuffle:
            return self.eval_row.expand(len(self), -1)
        return self.draw(len(self), generator)

    def __getitem__(self, i: int):
        x, y = self.views(torch.tensor([i]), self.eval_row[None])
        return x[0], y[0]


def augment_in_memory(data: DataSplits, cfg: AugmentConfig | None) -> DataSplits:
    """``data`` with its in-memory train split augmented on the device and val/test centre-cropped (when
    ``crop_eval``); unchanged without a random ``cfg``."""
    if cfg is None or not cfg.random or not isinstance(data.train, TensorSplit):
        return data
    train = DeviceAugmentSplit(data.train, cfg, data.ignore_index)
    out = DataSplits(**{**data.__dict__, "train": train})
    for name in ("val", "test"):
        split = getattr(data, name)
        row = pack([eval_params(cfg, tuple(split.images.shape[-2:]))])
        if bool((row[0, 2:4] != 0).any() | (row[0, 4:6] != row[0, :2]).any()):
            rows = row.expand(len(split), -1)
            setattr(
                out,
                name,
                TensorSplit(*apply_views(split.images, split.targets, rows, cfg.pad, data.ignore_index)),
            )
    return out
