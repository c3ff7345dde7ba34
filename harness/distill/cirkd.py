"""``cirkd``: cross-image relational KD (Yang et al., CVPR 2022; code winycg/CIRKD), its three relational terms.

Embeddings: one tapped layer pair, by default the models' last ``kd_layers`` (the k-UNet's last decoder
stage; CIRKD taps the decoder's feature before the classifier). The student's map is resized to the
teacher's, both are average-pooled so that neither side exceeds ``max_side``, and each position's channel
vector is L2-normalised: u (student, raw channels), v (teacher), P positions per image; û = the same for
H(student feature), H = conv1x1 -> BN -> ReLU -> conv1x1 to the teacher's channels (trained with the student,
counted in ``kd_params``). KL(p || q) is summed over a row's entries and averaged over rows; softmax rows:

    minibatch_pixel = w_b * mean over image pairs (i, j) of the batch and positions p of
                      KL( softmax_q(v_i[p] . v_j[q] / tau) || softmax_q(u_i[p] . u_j[q] / tau) )
    memory_pixel    = w_p * mean over labelled positions a of the batch of
                      KL( softmax_k(v_a . m_k / tau) || softmax_k(û_a . m_k / tau) ),  m_k pixel memory
    memory_region   = w_r * the same against region memory r_k

Memory (``MemoryBank``): per class, a ring of ``pixel_memory`` teacher pixel embeddings and one of
``region_memory`` region embeddings (the normalised mean of v over one image's pixels of the class). Each
training step first pushes, for every image and every labelled class in it (labels resized to the map,
nearest), ``pixel_update`` of its pixels drawn at random and its region, then contrasts against
``pixel_contrast // K + 1`` slots per class (K classes; one draw of slot indices shared by the classes) and
``region_contrast // K + 1`` region slots, as the reference does. The rings start as random unit vectors
(the reference's start: the contrast set has its full size from the first step, so its FLOPs are those
measured on the first batch); ``filled`` counts the real entries per class. The bank is training state: it
lives in the distiller as buffers (``state_dict``, moved to the device with it; K x (pixel_memory +
region_memory) x D floats: 15 MB for digits_seg's 16-channel teacher tap, 430 MB at CIRKD's 19 classes and
256 channels), is kept across epochs, is pushed to only in training mode (not by the FLOP measurement or
validation), and starts afresh with every run, which builds its own distiller.

Defaults are the reference's: tau 0.1 (one temperature for every similarity; the KL itself at temperature 1),
w_b 1, memory sizes 20,000 pixels / 2,000 regions per class, contrast sets 4,096 / 1,024, 16 pixels per image
and class. w_p = w_r = 0.1, the reference code's default and its Cityscapes scripts, which gave the published
rows (DeepLabV3-R18 74.21 -> 76.38 with pixel KD, preset ``cirkd+kd``); its own VOC scripts use 0.01 (a VOC
run fell below the baseline at 0.1 until lowered to 0.01, CIRKD's issue tracker): set
``kd.memory_pixel_weight`` and ``kd.memory_region_weight`` to 0.01 on small datasets. ``max_side`` 8 is
ours: the reference pools 4 x 4 only when both sides reach 256 (its Cityscapes embedding, 64 x 128 at
batch 2 per GPU, is not pooled: set ``max_side: 128`` for its setting). The pair maps hold N^2 P^2 entries
and the memory logits A x (K x (4096 // K + 1)) for A labelled positions: at digits_seg's 32 x 32 tap and
batch 8 a step's terms took 225 ms of CPU at max_side 16 and 26 ms at 8, against 5 ms for the student's
own step (one thread, measured 2026-12-01).

Deviations: the rings wrap slot by slot (the reference writes a push that overruns the end into the last
slots and restarts at 0); no cross-GPU gathering (the reference's mini-batch term is per GPU as well).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.distill.adapters import feature_pairs, pair_shapes, pool_to, projector
from harness.distill.base import KD_METHODS, Distiller, FeatureKDConfig, match_spatial


class CIRKDConfig(FeatureKDConfig):
    method: Literal["cirkd"] = "cirkd"
    temperature_field: ClassVar[str | None] = "tau"
    knob_labels: ClassVar[dict[str, str]] = {**FeatureKDConfig.knob_labels, "tau": "τ"}

    tau: float = Field(0.1, gt=0, description="temperature of every similarity distribution")
    minibatch_weight: float = Field(1.0, ge=0, description="weight of the mini-batch pixel-to-pixel term")
    memory_pixel_weight: float = Field(0.1, ge=0, description="weight of the pixel-memory term (VOC: 0.01)")
    memory_region_weight: float = Field(0.1, ge=0, description="weight of the region-memory term (VOC: 0.01)")
    pixel_memory: int = Field(20000, ge=1, description="pixel embeddings kept per class")
    region_memory: int = Field(2000, ge=1, description="region embeddings kept per class")
    pixel_contrast: int = Field(4096, ge=1, description="pixel memory slots contrasted per step, all classes")
    region_contrast: int = Field(1024, ge=1, description="region memory slots contrasted per step")
    pixel_update: int = Field(16, ge=1, description="pixels pushed per image and class at each step")
    max_side: int = Field(8, ge=1, description="embeddings average-pooled to at most this many per side")


class MemoryBank(nn.Module):
    """Per class, a ring of ``size`` unit vectors of dimension ``dim`` (random unit vectors at the start)."""

    def __init__(self, num_classes: int, size: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(num_classes, size, dim, device=device), dim=2))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long, device=device))

    @torch.no_grad()
    def push(self, c: int, rows: torch.Tensor) -> None:
        size = self.queue.shape[1]
        rows = rows[-size:]
        start = int(self.ptr[c])
        slots = (start + torch.arange(len(rows), device=rows.device)) % size
        self.queue[c, slots] = rows.to(self.queue.dtype)
        self.ptr[c] = (start + len(rows)) % size
        self.filled[c] = min(int(self.filled[c]) + len(rows), size)

    def sample(self, total: int) -> torch.Tensor:
        """``total // K + 1`` slots of every class (one random draw shared by the classes), as (K * n, dim)."""
        k, size, dim = self.queue.shape
        idx = torch.randperm(size, device=self.queue.device)[: min(size, total // k + 1)]
        return self.queue[:, idx].reshape(-1, dim)


def row_kl(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(t) || softmax(s)), rows along the last dimension."""
    log_s, log_t = F.log_softmax(s_logits, dim=-1), F.log_softmax(t_logits, dim=-1)
    rows = s_logits.numel() // s_logits.shape[-1]
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / rows


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C), each position's channel vector of unit length."""
    return F.normalize(x.flatten(2), dim=1).transpose(1, 2)


def minibatch_pixel_kl(u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Pixel-to-pixel similarity distributions across every image pair of the batch. u, v: (N, P, C)."""
    s = torch.einsum("ipc,jqc->ijpq", u / tau, u)  # 1/tau on the (N, P, C) side: cheaper than on N^2 P^2
    with torch.no_grad():
        t = torch.einsum("ipc,jqc->ijpq", v / tau, v)
    return row_kl(s, t)


def memory_kl(anchors_s: torch.Tensor, anchors_t: torch.Tensor, memory: torch.Tensor, tau: float):
    """Similarity distributions of anchors (A, D) over memory entries (M, D), student against teacher."""
    with torch.no_grad():
        t = (anchors_t / tau) @ memory.T
    return row_kl((anchors_s / tau) @ memory.T, t)


def labels_at(targets: torch.Tensor, size) -> torch.Tensor:
    """Targets (N, H, W) resized to ``size`` (nearest), flattened to (N, h*w)."""
    resized = F.interpolate(targets[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long().flatten(1)


@KD_METHODS.register(CIRKDConfig)
class CIRKD(Distiller):
    def setup(self, student_shapes, teacher_shapes):
        pairs = pair_shapes(self, student_shapes, teacher_shapes, maps=True)
        if len(pairs) != 1:
            raise ValueError(
                f"cirkd: works on one layer pair (the embedding), got {len(pairs)}; set kd.num_layers: 1 "
                "or name one layer in kd.student_layers / kd.teacher_layers"
            )
        (s, t), cfg = pairs[0], self.cfg
        self.dim = int(t[1])
        self.head = nn.Sequential(
            projector(s[1], t[1], bn=True, relu=True), nn.Conv2d(t[1], t[1], 1, bias=False)
        )
        self.pixel_bank: MemoryBank | None = None
        self.region_bank: MemoryBank | None = None
        self.sizes = (cfg.pixel_memory, cfg.region_memory)

    def check_classes(self, num_classes):
        self.build_banks(num_classes)

    def build_banks(self, num_classes: int, device=None) -> None:
        """Allocate the memory once the number of classes is known (rebuilt if it changes)."""
        if self.pixel_bank is not None and self.pixel_bank.queue.shape[0] == num_classes:
            return
        self.pixel_bank = MemoryBank(num_classes, self.sizes[0], self.dim, device)
        self.region_bank = MemoryBank(num_classes, self.sizes[1], self.dim, device)

    @torch.no_grad()
    def push(self, v: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        """Each image's pixels (``pixel_update`` drawn at random) and region per labelled class."""
        for b in range(len(v)):
            for c in labels[b][valid[b]].unique().tolist():
                idx = (labels[b] == c).nonzero().squeeze(1)
                self.region_bank.push(c, F.normalize(v[b, idx].mean(0), dim=0)[None])
                pick = torch.randperm(len(idx), device=idx.device)[: self.cfg.pixel_update]
                self.pixel_bank.push(c, v[b, idx[pick]])

    def forward(self, batch):
        if not hasattr(self, "head"):
            raise ValueError("cirkd: projection head not built; call setup(student_shapes, teacher_shapes)")
        (s_raw, t_raw), cfg = feature_pairs(self, batch)[0], self.cfg
        k = batch.student_logits.shape[1]
        self.build_banks(k, t_raw.device)
        s = pool_to(match_spatial(s_raw, t_raw), cfg.max_side)
        s_proj = pool_to(match_spatial(self.head(s_raw), t_raw), cfg.max_side)
        t = pool_to(t_raw, cfg.max_side)
        if s_proj.shape != t.shape:
            raise ValueError(
                f"cirkd: projected student embedding {tuple(s_proj.shape)} does not match the teacher's "
                f"{tuple(t.shape)}; re-run setup with the probed shapes"
            )
        if batch.targets.dim() != 3 or len(batch.targets) != len(t):
            raise ValueError(
                f"cirkd: needs per-pixel targets (N, H, W) for {len(t)} images, got "
                f"{tuple(batch.targets.shape)}; it is a segmentation method"
            )
        u, v, u_proj = unit_rows(s), unit_rows(t), unit_rows(s_proj)
        labels = labels_at(batch.targets, t.shape[-2:])
        valid = (labels != batch.ignore_index) & (labels >= 0) & (labels < k)
        if self.training:  # the reference pushes the batch before contrasting against the memory
            self.push(v, labels, valid)
        anchors_s, anchors_t = u_proj[valid], v[valid]
        terms = {"minibatch_pixel": cfg.minibatch_weight * minibatch_pixel_kl(u, v, cfg.tau)}
        if len(anchors_t) == 0:  # no labelled position: nothing to contrast (kept in the graph)
            zero = 0.0 * u_proj.sum()
            return {**terms, "memory_pixel": zero, "memory_region": zero}
        pixels, regions = (
            self.pixel_bank.sample(cfg.pixel_contrast),
            self.region_bank.sample(cfg.region_contrast),
        )
        terms["memory_pixel"] = cfg.memory_pixel_weight * memory_kl(anchors_s, anchors_t, pixels, cfg.tau)
        terms["memory_region"] = cfg.memory_region_weight * memory_kl(anchors_s, anchors_t, regions, cfg.tau)
        return terms
