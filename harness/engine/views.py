"""Replayed teacher views (``train.teacher_views: V``): KD under random augmentation without a live teacher.

Before training, V views are drawn for every training image with the run's ``data.augment`` (from
``train.teacher_views_seed``, not the run's seed, so every trial and seed of a study shares them; in-memory
sources apply them on the device in batches, folder/voc/cityscapes in DataLoader workers: engine/file_views.py;
their parameters are saved under ``$HARNESS_VIEWS_DIR``, default ``mlruns/views``, and found again after a restart),
the teacher runs once on each view, and its logits (at the teacher's output resolution) and the tapped
features the distiller needs are stored in fp16: on the device when they fit ``train.teacher_cache_gb``, else
in memory-mapped files in that folder (one line says which, with the size). Each epoch every image trains on
one of its V stored views, chosen from a generator seeded by ``train.seed`` (runs repeat), and the distiller
gets the stored outputs of exactly that view, so a replayed view is the live teacher's view.
This is FKD's scheme (Shen & Xing, ECCV 2022) for dense outputs; it changes the augmentation distribution
(V fixed views instead of a fresh draw per step), which the ``replayed_views`` study measures.

``train.teacher_views_topk: k`` stores only the k largest logits per pixel and the pixel's logsumexp; the
other classes share the remaining probability mass evenly (FKD's marginal smoothing), so the softmax over
classes at T = 1 is the smoothed one and the top-k logits themselves are exact. The mean per-pixel
KL(full || top-k) over the stored views is logged as ``teacher_views_topk_kl``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

VIEWS_DIR = "mlruns/views"
LOGITS = "__logits__"


def views_root() -> Path:
    return Path(os.environ.get("HARNESS_VIEWS_DIR", VIEWS_DIR))


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def view_rows(source, views: int, seed: int, data_key: str, root: Path) -> tuple[torch.Tensor, str]:
    """(N, V, F) view parameters of every training image (in-memory: ``device_augment.FIELDS``; files:
    ``transforms.PARAM_FIELDS``), drawn image by image from ``seed``; saved beside the run and loaded from
    there when the same data, V and seed ask again."""
    key = digest("views", data_key, len(source), views, seed)
    path = root / key / "views.pt"
    if path.is_file():
        rows = torch.load(path, weights_only=True)
        if rows.shape[:2] == (len(source), views):
            return rows, key
    generator = torch.Generator().manual_seed(seed)
    rows = torch.stack([source.draw_image(i, views, generator) for i in range(len(source))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers drawing the same views at once
    torch.save(rows, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return rows, key


def stored_shapes(logits: torch.Size, features: dict[str, torch.Size], topk: int | None) -> dict[str, tuple]:
    """Per view: the name, shape and dtype of every stored tensor (logits, or top-k logits, their class
    indices and the logsumexp; then the features)."""
    c, *hw = logits
    if topk is None or topk >= c:
        out = {LOGITS: ((c, *hw), torch.float16)}
    else:
        index = torch.uint8 if c <= 256 else torch.int16
        out = {"__topk__": ((topk, *hw), torch.float16), "__index__": ((topk, *hw), index)}
        out["__lse__"] = (tuple(hw), torch.float16)
    return {**out, **{k: (tuple(s), torch.float16) for k, s in features.items()}}


def estimate_bytes(n: int, views: int, shapes: dict[str, tuple]) -> int:
    """Bytes the store of ``n`` images x ``views`` views allocates."""
    per_view = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes.values())
    return n * views * per_view


def _alloc(shape: tuple, dtype: torch.dtype, device, path: Path | None, memmaps: list) -> torch.Tensor:
    if path is None:
        return torch.empty(shape, dtype=dtype, device=device)
    np_dtype = {torch.float16: np.float16, torch.uint8: np.uint8, torch.int16: np.int16}[dtype]
    array = np.memmap(path, dtype=np_dtype, mode="r+" if path.is_file() else "w+", shape=shape)
    memmaps.append(array)
    return torch.from_numpy(array)


def top_k(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The k largest logits per pixel (N, k, H, W), their class indices and each pixel's logsumexp."""
    values, index = logits.float().topk(k, dim=1)
    return {"__topk__": values, "__index__": index, "__lse__": torch.logsumexp(logits.float(), dim=1)}


def from_top_k(values: torch.Tensor, index: torch.Tensor, lse: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits whose softmax keeps the top-k classes' probabilities and spreads the rest evenly over the
    others; the top-k logits are the stored ones."""
    values, lse = values.float(), lse.float()[:, None]
    rest = (1 - torch.exp(values - lse).sum(1, keepdim=True)).clamp_min(1e-12)
    fill = lse + torch.log(rest / (classes - values.shape[1]))
    out = fill.expand(-1, classes, *values.shape[2:]).clone()
    return out.scatter_(1, index.long(), values)


def topk_kl(logits: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Sum over pixels of KL(softmax(logits) || softmax(approx)) (T = 1) and the pixel count."""
    p = torch.log_softmax(logits.float(), 1)
    return (p.exp() * (p - torch.log_softmax(approx, 1))).sum(), p[:, 0].numel()


class ViewStore:
    """The teacher's outputs on every stored view: ``lookup(idx, view)`` gives float32 logits and features.
    With ``folder`` they are memory-mapped files there (``complete.json`` once filled: reused as they are)."""

    def __init__(self, shapes: dict, n: int, views: int, classes: int, device, folder: Path | None = None):
        self.classes, self.device, self.folder, self.kl = classes, device, folder, None
        self._memmaps: list = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        paths = {k: folder / f"{k.strip('_')}.bin" for k in shapes} if folder is not None else {}
        self.tensors = {
            k: _alloc((n, views, *s), d, device, paths.get(k), self._memmaps) for k, (s, d) in shapes.items()
        }
        self.complete = folder is not None and (folder / "complete.json").is_file()
        if self.complete:
            self.kl = json.loads((folder / "complete.json").read_text()).get("kl")

    @property
    def topk(self) -> bool:
        return "__topk__" in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def fill(self, live, batches) -> int:
        """Run the teacher on every stored view, ``batches`` of (images, image indices, view ids); returns
        the number of teacher forwards (images)."""
        kl, pixels, forwards = 0.0, 0, 0
        for x, idx, view in batches:
            logits, outputs = live(x.to(self.device), idx)
            outputs, forwards = dict(outputs), forwards + len(idx)
            if self.topk:
                outputs.update(top_k(logits, self.tensors["__topk__"].shape[2]))
                part, count = topk_kl(logits, from_top_k(*_topk(outputs), self.classes))
                kl, pixels = kl + float(part), pixels + count
            else:
                outputs[LOGITS] = logits
            for name, value in outputs.items():
                target = self.tensors[name]
                target[idx.to(target.device), view.to(target.device)] = value.to(target.device, target.dtype)
        self.kl = kl / pixels if pixels else None
        for array in self._memmaps:
            array.flush()
        if self.folder is not None:
            (self.folder / "complete.json").write_text(json.dumps({"kl": self.kl}))
        self.complete = True
        return forwards

    def lookup(self, idx: torch.Tensor, view: torch.Tensor):
        at = {k: t[idx.to(t.device), view.to(t.device)].to(self.device) for k, t in self.tensors.items()}
        logits = from_top_k(*_topk(at), self.classes) if self.topk else at[LOGITS].float()
        return logits, {k: v.float() for k, v in at.items() if not k.startswith("__")}


def _topk(d: dict) -> tuple:
    return d["__topk__"], d["__index__"], d["__lse__"]


class ViewChoice(Dataset):
    """A training split shown as stored views: each shuffled pass picks one of its V views per image (from a
    generator seeded by ``seed``, so the k-th pass of a run with that seed always picks the same); unshuffled
    passes and ``split[i]`` show view 0. ``current`` says which view each image shows."""

    deterministic = False

    def __init__(self, base, rows: torch.Tensor, seed: int):
        self.base, self.rows = base, rows
        self.generator = torch.Generator().manual_seed(seed)
        self.current = torch.zeros(len(rows), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def choose(self, shuffle: bool) -> torch.Tensor:
        n, views = self.rows.shape[:2]
        self.current = (
            torch.randint(views, (n,), generator=self.generator)
            if shuffle
            else torch.zeros_like(self.current)
        )
        return self.current


class ReplaySplit(ViewChoice):
    """Stored views of an in-memory split, made on the device in batches (``iterate_batches``)."""

    def pass_rows(self, shuffle: bool, generator=None) -> torch.Tensor:
        return self.rows[torch.arange(len(self.rows)), self.choose(shuffle)]

    def views(self, idx: torch.Tensor, rows: torch.Tensor):
        return self.base.views(idx, rows)

    def __getitem__(self, i: int):
        x, y = self.views(torch.tensor([i]), self.rows[i, self.current[i]][None])
        return x[0], y[0]


class MemoryViews:
    """Drawing, applying and replaying the stored views of an in-memory split (``DeviceAugmentSplit``)."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def draw_image(self, i: int, views: int, generator: torch.Generator) -> torch.Tensor:
        return self.split.draw(views, generator)

    def probe(self, rows: torch.Tensor) -> torch.Tensor:
        return self.split.views(torch.arange(1), rows[:1, 0])[0]

    def batches(self, rows: torch.Tensor, batch: int):
        n, views = rows.shape[:2]
        for v in range(views):
            for start in range(0, n, batch):
                idx = torch.arange(start, min(start + batch, n))
                yield self.split.views(idx, rows[idx, v])[0], idx, torch.full_like(idx, v)

    def replay(self, rows: torch.Tensor, seed: int) -> ReplaySplit:
        return ReplaySplit(self.split, rows, seed)


def view_source(split):
    """How ``split``'s views are drawn and applied: in memory, from files (engine/file_views.py), or None."""
    from harness.engine.file_views import FileViews, is_file_split

    if hasattr(split, "draw"):
        return MemoryViews(split)
    return FileViews(split) if is_file_split(split) else None


class ReplayTeacher:
    """Serves (logits, features) of the view each sample of the batch shows in the current pass."""

    def __init__(self, store: ViewStore, split: ReplaySplit, cache_flops: float):
        self.store, self.split = store, split
        # logged by the run: the one-off teacher pass (0 when the store was reused), the top-k error
        self.metrics = {
            "teacher_cache_flops": float(cache_flops),
            "teacher_views": float(split.rows.shape[1]),
        }
        if store.kl is not None:
            self.metrics["teacher_views_topk_kl"] = store.kl

    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        idx = idx.cpu()
        return self.store.lookup(idx, self.split.current[idx])


def place(need: int, cache_gb: float, root: Path) -> str | None:
    """Where a store of ``need`` bytes goes: ``device`` within ``cache_gb``, else ``memmap`` when the views
    folder's disk has room (with 10% to spare), else None."""
    if need <= cache_gb * 2**30:
        return "device"
    root.mkdir(parents=True, exist_ok=True)
    return "memmap" if need <= 0.9 * shutil.disk_usage(root).free else None


def size_line(n: int, views: int, shapes: dict, need: int, where: str | None, cache_gb: float, root) -> str:
    """The one line saying how large the store is and where it goes (or why it cannot be kept)."""
    what = ", ".join(f"{k.strip('_')} {'x'.join(map(str, s))}" for k, (s, _) in shapes.items())
    size = f"teacher views: {n} images x {views} views ({what}; fp16) = {need / 2**20:.1f} MB"
    if where == "device":
        return f"{size} -> on the device (within train.teacher_cache_gb {cache_gb:g})"
    if where == "memmap":
        return f"{size} > train.teacher_cache_gb {cache_gb:g} -> memory-mapped under {root}"
    return f"{size}: more than train.teacher_cache_gb {cache_gb:g} and the free disk under {root}"


_STORES: dict[str, ViewStore] = {}  # one study's store at a time, reused by its trials in this process


def serve_views(live, teacher, split, train_cfg, device, key: tuple) -> tuple[ReplayTeacher | None, str]:
    """The replayed-view server for ``split`` and how it serves (the ``teacher.outputs`` tag), or None and
    why the teacher must run live. ``key``: the teacher's and the data's configs (JSON)."""
    from harness.engine.evaluate import count_flops
    from harness.engine.progress import console

    source = view_source(split)
    if source is None:
        return None, (
            "train.teacher_views needs an in-memory source (digits_seg, microscopy) or a folder/voc/cityscapes "
            f"train split with a random data.augment; this train split ({type(split).__name__}) draws no "
            "storable view parameters"
        )
    views, topk, root = train_cfg.teacher_views, train_cfg.teacher_views_topk, views_root()
    rows, views_key = view_rows(source, views, train_cfg.teacher_views_seed, key[1], root)
    x = source.probe(rows).to(device)
    logits, feats = live(x.to(device), torch.arange(1))
    shapes = stored_shapes(logits.shape[1:], {k: v.shape[1:] for k, v in feats.items()}, topk)
    need = estimate_bytes(len(split), views, shapes)
    out_key = digest(views_key, key[0], sorted(feats), topk, device.type, str(logits.dtype))
    forwards, store = 0, _STORES.get(out_key)
    if store is None:
        where = place(need, train_cfg.teacher_cache_gb, root)
        line = size_line(len(split), views, shapes, need, where, train_cfg.teacher_cache_gb, root)
        if where is None:
            return None, line
        console.print(line, soft_wrap=True, highlight=False)
        folder = root / out_key if where == "memmap" else None
        store = ViewStore(shapes, len(split), views, logits.shape[1], device, folder)
        if not store.complete:
            forwards = store.fill(live, source.batches(rows, max(train_cfg.batch_size, 64)))
        _STORES.clear()
        _STORES[out_key] = store
    flops = count_flops(teacher, x) * forwards if forwards else 0.0  # the one-off pass, charged once
    server = ReplayTeacher(store, source.replay(rows, train_cfg.seed), flops)
    where = "memory-mapped" if store.folder is not None else "device"
    top = f", top-{topk}" if store.topk else ""
    served = f"replayed views (V={views}{top}, {where}, {store.nbytes / 2**20:.1f} MB)"
    return server, served if forwards else served + " (reused)"
