"""One run on several processes: PyTorch's DistributedDataParallel, launched the standard way (torchrun).

A process started by ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment) joins the process group when its run is prepared: NCCL with one GPU per process (GPU
LOCAL_RANK), gloo on the CPU (``HARNESS_DIST_BACKEND`` overrides). What every process then does alike:

* ``train.batch_size`` stays the global batch (images per optimizer step, all processes together):
  each global batch of the one-process order is split by rank (``batch[rank::world]``), which is what
  torch's DistributedSampler gives, with the per-epoch reshuffle drawn from the run's seeded generator,
  so one process and N processes train on the same global batches in the same order;
* ``train.grad_accum`` splits each process's share again into micro-steps (DDP's ``no_sync`` until the
  last), so the global batch is kept on fewer GPUs; the loss of a micro-step is weighted by its share;
* the student, and the KD method's trainable modules, are wrapped in DDP (gradients averaged over
  processes); ``train.sync_bn`` turns batch norm into SyncBatchNorm (CUDA only, as in torch);
* validation and test are sharded the same way and their sums (loss, confusion matrix, counts) all-reduced,
  so mIoU is the one-process figure on the same model;
* rank 0 alone logs (the others get a :class:`SilentRun`) and alone reports to Optuna; what it decides
  after an epoch (go on, or stop: pruned, interrupted) is broadcast, so every rank leaves at the same epoch.

The CE and KD losses are means per process, as in every DDP trainer: with ignored pixels spread unevenly
over the processes the averaged gradient differs slightly from the one-process mean over all pixels.
Within a study each seed of a trial is one such group started by the worker (``--gpus-per-trial``); a
group writes into ``HARNESS_GROUP_DIR`` what the worker needs to record its end (see harness/sweep/group.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from harness.errors import ConfigError

GROUP_DIR = "HARNESS_GROUP_DIR"  # set by the worker that launched this group: where ranks leave their ends
BACKEND = "HARNESS_DIST_BACKEND"  # gloo or nccl instead of the device's default
TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this fails (torch's default for gloo)


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; one process alone is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


class Stopped(Exception):
    """Rank 0 ended the run after an epoch (pruned, interrupted, failed): this rank ends too, quietly."""


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process in a group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Dist:
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    rank = dist.get_rank()
    return Dist(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def setup(device_name: str) -> Dist:
    """Join the group torchrun set up (once per process); a process not launched so stays alone."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = os.environ.get(BACKEND) or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(teardown)  # a process group left to the interpreter's exit aborts the process
    return current()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def place(device: torch.device, ctx: Dist) -> torch.device:
    """One GPU per process: GPU LOCAL_RANK of those visible."""
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def check(train_cfg, ctx: Dist, device: torch.device) -> None:
    """What DDP and gradient accumulation need of a recipe, as one-line errors."""
    parts = ctx.world * train_cfg.grad_accum
    if train_cfg.batch_size % parts:
        raise ConfigError(
            f"train.batch_size {train_cfg.batch_size} (the global batch) does not split into {ctx.world} "
            f"process(es) x train.grad_accum {train_cfg.grad_accum}; use a multiple of {parts}"
        )
    if train_cfg.sync_bn and device.type != "cuda":
        raise ConfigError(
            "train.sync_bn: torch's SyncBatchNorm runs on GPUs only; set train.sync_bn false on the CPU"
        )
    if ctx.active and train_cfg.budget is not None and train_cfg.budget.seconds is not None:
        raise ConfigError(
            "train.budget.seconds is measured per process and would end the processes at different steps; "
            "use train.budget.flops (or train.iterations) with several processes"
        )


def tags(ctx: Dist) -> dict[str, str]:
    if not ctx.active:
        return {}
    return {"distributed": f"{ctx.world} processes ({dist.get_backend()})"}


@contextlib.contextmanager
def main_first(ctx: Dist):
    """Rank 0 runs the block first (it may download or write what the others then read)."""
    if ctx.active and not ctx.main:
        dist.barrier()
    yield
    if ctx.active and ctx.main:
        dist.barrier()


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the group, in place (nothing to do alone)."""
    if current().active:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_mean(t: torch.Tensor) -> torch.Tensor:
    ctx = current()
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= ctx.world
    return t


def reduce_metric_states(metric) -> None:
    """A torchmetrics metric updated on this rank's shard made whole: each state summed over the group
    (exact for the integer counts of a confusion matrix)."""
    for name, value in metric.metric_state.items():
        if getattr(metric._reductions.get(name), "__name__", "") != "dim_zero_sum":
            raise ValueError(f"{type(metric).__name__}.{name} is not a summed state")
        all_sum(value)


def on_main(ctx: Dist, fn, *args) -> None:
    """``fn(*args)`` on rank 0 alone, and what it decided passed on: if it raised (Optuna pruned the trial,
    an interrupt), rank 0 re-raises and every other rank raises :class:`Stopped`, at the same point."""
    if not ctx.active:
        fn(*args)
        return
    error = None
    if ctx.main:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            error = exc
    decision = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(decision, src=0)
    if error is not None:
        raise error
    if decision[0] is not None:
        raise Stopped(decision[0])


def wrap(module: nn.Module, ctx: Dist, device: torch.device, *, kd: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train it, else itself. A KD method's
    modules may go unused in a step and keep their own buffers (memory banks): unused parameters are
    searched for and buffers not broadcast there."""
    if not ctx.active or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    local = {}  # a KD method's buffers stay each rank's own (torch 2.14 renamed the switch)
    if kd:
        name = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_options() else "broadcast_buffers"
        local = {name: False}
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=kd, **local)


def _ddp_options() -> set[str]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


def sync_batch_norm(model: nn.Module, train_cfg, ctx: Dist) -> nn.Module:
    if train_cfg.sync_bn and ctx.active:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def no_sync(modules: list[nn.Module], last: bool):
    """DDP's ``no_sync`` on every wrapped module except on a step's last micro-step."""
    stack = contextlib.ExitStack()
    if not last:
        for m in modules:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
    return stack


def micro_batches(n: int, accum: int) -> list[slice]:
    """``accum`` slices of ``n`` samples (fewer when ``n`` is smaller)."""
    size = -(-n // accum)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class SilentRun:
    """What ranks other than 0 log to: nothing. Rank 0 alone logs the run."""

    id = ""

    def start_run(self, *args, **kwargs) -> SilentRun:  # stands in for the tracker too
        return self

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# --- a group launched by a worker: what its ranks leave in HARNESS_GROUP_DIR -----------------------------


def group_dir() -> Path | None:
    path = os.environ.get(GROUP_DIR)
    return Path(path) if path else None


def leave(name: str, payload: dict) -> None:
    """Write ``<name>.json`` into the group directory (atomically), if this process is in a group."""
    where = group_dir()
    if where is None:
        return
    tmp = where / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**payload, "time": time.time(), "pid": os.getpid()}))
    tmp.replace(where / f"{name}.json")


def leave_failure(rank: int) -> None:
    """This rank's traceback (call inside ``except``)."""
    leave(f"rank{rank}.failed", {"rank": rank, "traceback": traceback.format_exc()})


def root_failure(where: Path, launcher_log: str) -> tuple[int | None, str]:
    """Which rank ended the group, and its traceback. A rank killed by a signal other than torchrun's own
    SIGTERM (SIGKILL, out of memory, a crash) leaves no traceback: it is the cause, and torchrun's report
    says how it died. Otherwise the earliest traceback a rank left; otherwise torchrun's output."""
    failed = {}
    for path in where.glob("rank*.failed.json"):
        left = json.loads(path.read_text())
        failed[left["rank"]] = left
    exits = re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", launcher_log)
    killed = sorted(
        int(r) for r, code in exits if int(code) < 0 and int(code) != -15 and int(r) not in failed
    )
    if killed:
        report = "torchrun reported:\n" + launcher_log[-3000:]
        return killed[0], (
            f"rank {killed[0]} ended without a traceback (killed by a signal, or out of memory)\n{report}"
        )
    if failed:
        first = min(failed.values(), key=lambda left: left["time"])
        return first["rank"], first["traceback"]
    return None, "the group ended before any rank could say why; torchrun's output:\n" + launcher_log[-4000:]
