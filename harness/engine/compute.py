"""Training compute: what one training step costs in FLOPs, a meter for the steps actually taken, and the
end of training when a budget (``train.budget``) is spent.

How FLOPs are counted (README, "Equal compute"):

* the student: forward FLOPs per image from torch's FlopCounterMode (``count_flops``), the backward pass
  counted as twice the forward, so a training step costs 3 x forward per image;
* the KD method's own work (adapters, regressors, generators, similarity maps): the distiller's forward and
  backward measured with the same counter on one training batch, so work that has no backward (frozen
  encoders, the teacher side) counts once and trained modules about 3 times. The counter sees matrix
  products and convolutions, not element-wise loss arithmetic (softmax, KL), which is negligible next to them;
* the teacher's forward per image when it runs live;
* the KD costs only in epochs whose KD weight beta is above zero (the teacher is not run otherwise);
* the teacher cache (one teacher forward over the training set) is not drawn from any run's budget, which
  must be the same for every run: the run that built it logs its cost as ``teacher_cache_flops`` (runs that
  reused it log 0) and the report divides the study's total over the runs that used a cache.

A FLOPs budget buys a number of steps known before training (the cost per step is fixed): training stops
there and a cosine learning rate is laid over those steps. A seconds budget is checked after every step
against the wall time of the training steps; its cosine follows the elapsed fraction of the budget (or of
``train.epochs``, whichever is further along).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from harness.distill.base import Distiller, KDBatch
from harness.engine.evaluate import count_flops
from harness.engine.teacher import LiveTeacher
from harness.errors import HarnessError
from harness.models.taps import FeatureTap


@dataclass(frozen=True)
class StepCost:
    """Training FLOPs per image: the student's forward and backward, plus what KD adds while it is on."""

    student: float
    kd: float = 0.0

    def per_image(self, kd_on: bool) -> float:
        return self.student + (self.kd if kd_on else 0.0)


def first_batch(split, n: int, device: torch.device):
    if hasattr(split, "images"):
        n = min(n, len(split))
        return split.images[:n].to(device), split.targets[:n].to(device), torch.arange(n)
    items = [split[i] for i in range(min(n, len(split)))]
    x, y = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    return x.to(device), y.to(device), torch.arange(len(items))


def distiller_flops(model: nn.Module, distiller: Distiller, server, batch, ignore_index: int) -> int:
    """FLOPs of the distiller's forward and backward on one batch, counted as they run: work with no backward
    (frozen encoders, the teacher side's similarity or attention maps) counts once. The student's outputs
    enter as leaves, so neither the student's forward nor its backward is counted here."""
    x, y, idx = batch
    was_training = distiller.training
    model.eval()
    distiller.eval()  # batch norm in an adapter must not update its statistics here
    grads = [p.grad for p in distiller.parameters()]
    rng_devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        with torch.no_grad(), FeatureTap(model, distiller.student_layers) as tap:
            logits = model(x)
            t_logits, t_feats = server(x, idx)
        feats = {k: v.detach().requires_grad_() for k, v in tap.features.items()}
        kd_batch = KDBatch(logits.detach().requires_grad_(), y, t_logits, feats, t_feats, ignore_index)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            loss = sum(distiller(kd_batch).values())
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
    for p, grad in zip(distiller.parameters(), grads):
        p.grad = grad
    distiller.train(was_training)
    return int(counter.get_total_flops())


def measure_step_cost(
    model: nn.Module, distiller: Distiller, server, teacher: nn.Module | None, data, batch_size: int, device
) -> StepCost:
    batch = first_batch(data.train, batch_size, device)
    student = 3.0 * count_flops(model, batch[0])
    if server is None or not distiller.needs_teacher:
        return StepCost(student)
    kd = distiller_flops(model, distiller, server, batch, data.ignore_index) / len(batch[0])
    if isinstance(server, LiveTeacher):
        kd += count_flops(teacher, batch[0])
    return StepCost(student, kd)


def teacher_cache_flops(served: str, teacher: nn.Module | None, data, device) -> float | None:
    """One teacher forward over the training set for the run that built the cache, 0 for runs reusing it,
    None when no cache was used."""
    if not served.startswith("cached"):
        return None
    if served != "cached":
        return 0.0
    return float(count_flops(teacher, first_batch(data.train, 1, device)[0]) * len(data.train))


def epoch_batches(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """The batch sizes of one epoch, as ``iterate_batches`` yields them."""
    sizes = [batch_size] * (n // batch_size)
    if n % batch_size and not (drop_last and n >= batch_size):
        sizes.append(n % batch_size)
    return sizes


def affordable_steps(limit: float, cost: StepCost, batches: list[int], kd_on: list[bool]) -> int:
    """How many steps a FLOPs budget buys, walking through the epochs (at most ``len(kd_on)``) in order."""
    spent, steps = 0.0, 0
    for on in kd_on:
        for images in batches:
            step = images * cost.per_image(on)
            if spent + step > limit:
                return steps
            spent, steps = spent + step, steps + 1
    return steps


class Meter:
    """Counts the training steps taken, their FLOPs and wall seconds; tells when the budget is spent."""

    def __init__(self, budget, cost: StepCost, batches: list[int], kd_on: list[bool], device):
        self.budget, self.cost, self.device = budget, cost, device
        self.max_steps = len(batches) * len(kd_on)
        self.planned = self.max_steps
        if budget is not None and budget.flops is not None:
            self.planned = affordable_steps(budget.flops, cost, batches, kd_on)
            if self.planned == 0:
                raise HarnessError(
                    f"train.budget.flops {budget.flops:.3g} buys no training step (one costs "
                    f"{batches[0] * cost.per_image(kd_on[0]):.3g} FLOPs); raise it"
                )
        self.steps, self.flops, self.seconds = 0, 0.0, 0.0
        self.kd_on, self._start = False, None

    def start_epoch(self, kd_on: bool) -> None:
        self.kd_on, self._start = kd_on, time.perf_counter()

    def end_epoch(self) -> None:
        self.seconds, self._start = self.elapsed(), None

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def add(self, images: int) -> None:
        self.steps += 1
        self.flops += images * self.cost.per_image(self.kd_on)
        if self._by_seconds and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host runs ahead of the GPU: time what was done

    @property
    def _by_seconds(self) -> bool:
        return self.budget is not None and self.budget.seconds is not None

    @property
    def spent(self) -> bool:
        if self.budget is None:
            return False
        if self._by_seconds:
            return self.elapsed() >= self.budget.seconds
        return self.steps >= self.planned

    def progress(self) -> float:
        """Fraction of training done, for a learning-rate schedule laid over the budget."""
        done = self.steps / self.planned
        if self._by_seconds:
            done = max(done, self.elapsed() / self.budget.seconds)
        return min(done, 1.0)

    def metrics(self) -> dict[str, float]:
        out = {"train_flops": self.flops, "train_seconds": self.seconds, "train_steps": float(self.steps)}
        if self.budget is not None:
            used = self.seconds / self.budget.seconds if self._by_seconds else self.flops / self.budget.flops
            out["budget_spent"] = used
        return out


def budget_lr(optimizer: torch.optim.Optimizer, train_cfg):
    """With a budget and ``scheduler: cosine``: a function setting the learning rate from the fraction of
    training done (cosine from the initial value to 0); None otherwise (epoch schedulers apply)."""
    if train_cfg.budget is None or train_cfg.scheduler != "cosine":
        return None
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    def set_lr(progress: float) -> None:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    return set_lr
