"""Teachers: finding (or training, once) the one a config names, loading it, and serving its outputs to the
trainer live or from a cache.

A teacher is named by an experiment file (trained once, then found again in MLflow by its config hash) or
by a checkpoint file. During training the distiller receives the teacher's logits and tapped features; when
the training inputs are the same every epoch these are computed once, stored on the device in the dtype the
live teacher produces (bf16 under CUDA autocast, fp32 on the CPU or with ``train.amp: false``, so cached and
live outputs are the same numbers) and looked up by sample index, across epochs and across the trials of
one process. Under random augmentation ``train.teacher_views`` replays stored views instead
(engine/views.py).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from harness.data.base import DataSplits
from harness.data.loader import fixed_inputs, iterate_batches
from harness.data.normalize import describe_normalization
from harness.distill.base import warn_once
from harness.engine.views import serve_views
from harness.errors import ConfigError, HarnessError
from harness.models import build_model
from harness.models.taps import FeatureTap
from harness.tracking.provenance import HOST

CHECKPOINT_NAME = "model.pt"
CHECKPOINT_TAG = "checkpoint.sha256"  # set on a run once its whole model.pt is in the store
TEACHER_EXPERIMENT = "teachers"  # where teachers trained on demand are logged
# A teacher run whose heartbeat is older than this is dead, like a trial's lease (sweep/leases.py); the same
# HARNESS_LEASE_GRACE overrides it.
HEARTBEAT_GRACE = 60.0


def is_checkpoint(spec: str) -> bool:
    return spec.endswith((".pt", ".pth"))


def teacher_config(spec: str):
    """The experiment config of a teacher named by an experiment file (it must train without KD)."""
    from harness.config import load_experiment

    cfg = load_experiment(spec)
    if cfg.kd.method != "none":
        raise HarnessError(f"{spec}: a teacher is trained without KD; set its kd.method to none")
    return cfg


def find_teacher(spec: str, tracker) -> tuple[str, str] | None:
    """(run id, experiment) of a finished run of the teacher experiment ``spec`` (found by its config hash):
    in ``teachers`` first, then in any experiment (a study's seed run with the same config)."""
    config_hash = teacher_config(spec).hash()
    return tracker.finished_run(config_hash, [TEACHER_EXPERIMENT]) or tracker.finished_run(config_hash)


def find_teacher_run(spec: str, tracker) -> str | None:
    """The run id of :func:`find_teacher`, if any."""
    found = find_teacher(spec, tracker)
    return found[0] if found else None


def find_or_train_teacher(spec: str, tracker, quiet: bool = False) -> tuple[str, str]:
    """(run id, experiment) of the teacher experiment ``spec``: an earlier finished run, else one trained
    now. Runs of it left RUNNING by a process that died are closed as KILLED first."""
    found = find_teacher(spec, tracker)
    if found is not None:
        return found
    from harness.engine.progress import console, epoch_progress
    from harness.engine.run import run_experiment

    cfg = teacher_config(spec)
    closed = close_dead_teacher_runs(tracker, cfg.hash())
    if not quiet:
        again = f" again (run {', '.join(closed)} died with its process: closed as KILLED)," if closed else ""
        console.print(
            f"Training teacher [bold]{spec}[/bold]{again} once for this and later runs "
            f"(MLflow experiment '{TEACHER_EXPERIMENT}', config hash {cfg.hash()})"
        )
    with epoch_progress(cfg.train.epochs, f"teacher {cfg.name}", enabled=not quiet) as progress:
        outcome = run_experiment(
            cfg, tracker, experiment=TEACHER_EXPERIMENT, role="teacher", progress=progress
        )
    if outcome.state != "finished":
        raise HarnessError(f"training teacher {spec} ended {outcome.state}; fix its recipe and run again")
    return outcome.run_id, TEACHER_EXPERIMENT


def close_dead_teacher_runs(tracker, config_hash: str) -> list[str]:
    """Close as KILLED (with a ``failure`` tag) the teacher runs of this config left RUNNING by a process
    that is gone; returns their ids."""
    closed = []
    for record in tracker.open_runs(TEACHER_EXPERIMENT, config_hash):
        why = dead_because(record, time.time())
        if why is not None:
            run = tracker.run(record["run_id"])
            run.set_tags({"failure": f"teacher training died: {why}; trained again by a later run"})
            run.end("abandoned")
            closed.append(record["run_id"])
    return closed


def dead_because(record: dict, now: float) -> str | None:
    """Why a RUNNING run's process is dead, or None while it may be alive: on this host its pid is gone;
    anywhere, its last heartbeat (or its start, for runs from before heartbeats) is older than the grace."""
    host, pid = record.get("tags.host"), record.get("tags.pid")
    if host == HOST and pid and not pid_alive(int(pid)):
        return f"process {host}:{pid} is gone"
    last = float(record.get("tags.heartbeat") or (record.get("start_time") or 0) / 1000)
    grace = float(os.environ.get("HARNESS_LEASE_GRACE", HEARTBEAT_GRACE))
    if now - last > grace:
        return f"no heartbeat from {host or 'its process'}:{pid or '?'} for {now - last:.0f} s"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def load_teacher(spec: str, tracker, device: torch.device, data: DataSplits, data_cfg=None):
    """The frozen teacher model, tags saying where it came from (``teacher.source``, and for a teacher run
    ``teacher.found_in``: ``<experiment>/<run id>``), and its training config.

    With the student's ``data_cfg``, the teacher's input normalisation (in its recorded config) must match."""
    student_data = data_cfg.model_dump(mode="json") if data_cfg is not None else None
    if is_checkpoint(spec):
        model, payload = load_checkpoint(spec, device)
        tags = {"teacher.source": f"checkpoint {spec}"}
    else:
        if student_data is not None:  # before the teacher is trained
            check_normalization(
                spec, teacher_config(spec).model_dump(mode="json"), student_data, data.in_channels
            )
        for attempt in range(3):  # a run whose model.pt does not verify is failed; the teacher trains again
            run_id, experiment = find_or_train_teacher(spec, tracker)
            try:
                model, payload = load_run_checkpoint(tracker, run_id, device)
                break
            except CorruptCheckpoint as exc:
                if attempt == 2:
                    raise
                discard_teacher_run(tracker, run_id, exc)
        tags = {"teacher.source": f"run {run_id} ({spec})", "teacher.found_in": f"{experiment}/{run_id}"}
    if payload["num_classes"] != data.num_classes or payload["in_channels"] != data.in_channels:
        raise HarnessError(
            f"teacher {spec} was trained for {payload['num_classes']} classes / {payload['in_channels']} input "
            f"channels but the data has {data.num_classes} / {data.in_channels}; train the teacher on the same "
            "dataset"
        )
    if student_data is not None:
        check_normalization(spec, payload["config"], student_data, data.in_channels)
    return model, tags, payload["config"]


def check_normalization(spec: str, teacher_cfg: dict, student_data: dict, in_channels: int) -> None:
    """A one-line HarnessError unless the student's data normalises inputs as the teacher's did."""
    theirs = describe_normalization(teacher_cfg.get("data") or {}, in_channels)
    ours = describe_normalization(student_data, in_channels)
    if ours != theirs:
        raise HarnessError(
            f"teacher {spec} was trained with input normalisation {theirs} but this run's data has {ours}; "
            "set data.normalize to the teacher's so both see the same inputs"
        )


def checkpoint_payload(model: nn.Module, cfg, data: DataSplits) -> dict:
    return {
        "config": cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "in_channels": data.in_channels,
        "num_classes": data.num_classes,
    }


class CorruptCheckpoint(ConfigError):
    """A checkpoint that does not read back as the model it was written from (truncated, changed, not ours)."""


def save_checkpoint(payload: dict, path: str | Path) -> str:
    """Write ``payload`` to ``path`` and return the file's sha256. Written under a temporary name in the same
    folder, flushed to disk, then renamed: a process killed while writing leaves no file under ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_run_checkpoint(tracker, run_id: str, device: torch.device) -> tuple[nn.Module, dict]:
    """A run's model.pt, checked against the sha256 the run recorded after uploading it (runs from before
    digests were recorded: checked only by loading it)."""
    expected = (tracker.run_record(run_id) or {}).get(f"tags.{CHECKPOINT_TAG}")
    with tempfile.TemporaryDirectory() as tmp:
        return load_checkpoint(tracker.download(run_id, CHECKPOINT_NAME, tmp), device, expected)


def discard_teacher_run(tracker, run_id: str, why: Exception) -> None:
    """A teacher run whose model.pt does not verify: one line, and the run is failed so no lookup finds it."""
    print(
        f"warning: teacher run {run_id}: {why}; the run is marked failed, the teacher trains again",
        file=sys.stderr,
    )
    run = tracker.run(run_id)
    run.set_tags({"failure": f"{CHECKPOINT_NAME} does not verify: {why}"[:500]})
    run.end("failed")


def load_checkpoint(
    path: str | Path, device: torch.device, sha256: str | None = None
) -> tuple[nn.Module, dict]:
    """The frozen model in a checkpoint; with ``sha256``, the file must have that digest. A truncated,
    changed or foreign file is a one-line :class:`CorruptCheckpoint`, never a model."""
    from harness.config import build_experiment

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"teacher checkpoint {path} not found; give an existing .pt file or an experiment file"
        )
    found = file_sha256(path) if sha256 else None
    if found != sha256:
        raise CorruptCheckpoint(
            f"{path}: sha256 {found[:12]}... is not the {sha256[:12]}... recorded when it was written "
            "(truncated or changed since)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = build_experiment(payload["config"], str(path))
        # the checkpoint holds the trained weights: the config's model.weights file is not read again
        model = build_model(cfg.model, payload["in_channels"], payload["num_classes"], load_weights=False)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptCheckpoint(
            f"{path}: not a kd-harness checkpoint, or a truncated one ({why}); use a model.pt logged by a "
            "harness run"
        ) from None
    return freeze(model.to(device)), payload


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LiveTeacher:
    """Runs the frozen teacher on each batch under no_grad."""

    def __init__(self, model: nn.Module, layers: list[str], autocast):
        self.model, self.layers, self.autocast = model, layers, autocast
        self.tap = FeatureTap(model, layers)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        with self.tap, self.autocast():
            logits = self.model(x)
        return logits, dict(self.tap.features)


class CachedTeacher:
    """The teacher's outputs for every training sample, computed once and stored in the dtype they come in
    (the training dtype: bf16 under autocast, else fp32), so serving from the cache changes no value."""

    def __init__(self, live: LiveTeacher, split, device: torch.device, batch_size: int):
        self.store: dict[str, torch.Tensor] = {}
        for x, _, idx in iterate_batches(split, batch_size, device=device, shuffle=False):
            logits, feats = live(x, idx)
            for name, value in {"__logits__": logits, **feats}.items():
                if name not in self.store:
                    self.store[name] = torch.empty(
                        (len(split), *value.shape[1:]), dtype=value.dtype, device=device
                    )
                self.store[name][idx.to(device)] = value

    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        idx = idx.to(self.store["__logits__"].device)
        feats = {k: v[idx].float() for k, v in self.store.items() if k != "__logits__"}
        return self.store["__logits__"][idx].float(), feats


def cache_bytes(live: LiveTeacher, split, device: torch.device) -> int:
    x, _, idx = next(iterate_batches(split, 1, device=device, shuffle=False))
    logits, feats = live(x, idx)
    per_sample = sum(t.numel() * t.element_size() for t in (logits, *feats.values()))
    return per_sample * len(split)


_CACHE: dict[tuple, CachedTeacher] = {}


def serve_teacher(
    model: nn.Module, layers: list[str], data: DataSplits, train_cfg, device, autocast, key: tuple
):
    """A callable (x, idx) -> (logits, features): cached when inputs are fixed and it fits, replayed views
    (engine/views.py) under random augmentation with ``train.teacher_views``, live otherwise.

    Returns the server and a short description for the run's tags.
    """
    live = LiveTeacher(model, layers, autocast)
    if train_cfg.teacher_views and not fixed_inputs(data.train):
        server, served = serve_views(live, model, data.train, train_cfg, device, key)
        if server is None:
            warn_once(f"{served}: the teacher runs live")
            return live, f"live ({served})"
        return server, served
    if train_cfg.teacher_views:
        warn_once(
            "train.teacher_views: the training inputs are fixed (no random data.augment); cached instead"
        )
    if not train_cfg.teacher_cache or not fixed_inputs(data.train):
        return live, "live"
    full_key = (*key, tuple(layers), str(device))
    if full_key in _CACHE:
        return _CACHE[full_key], "cached (reused)"
    need = cache_bytes(live, data.train, device)
    if need > train_cfg.teacher_cache_gb * 2**30:
        return live, f"live (cache would need {need / 2**30:.1f} GB > train.teacher_cache_gb)"
    _CACHE.clear()  # keep one study's cache at a time
    _CACHE[full_key] = CachedTeacher(live, data.train, device, max(train_cfg.batch_size, 64))
    return _CACHE[full_key], "cached"
