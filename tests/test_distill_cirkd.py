"""``cirkd`` (Yang et al., CVPR 2022): the three relational terms written out with loops on small tensors, zero
when the student's embeddings are the teacher's, where gradients go, one-line errors, and the memory bank as
training state (fills, wraps, pushed only in training, kept across epochs, fresh in every run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.data import load_data
from harness.distill import KD_METHODS, KDBatch
from harness.distill.cirkd import MemoryBank
from harness.engine.compute import measure_step_cost
from harness.engine.fit import fit
from harness.engine.run import build_distiller, seed_everything
from harness.engine.teacher import freeze, serve_teacher
from harness.errors import HarnessError
from harness.models import build_model
from tests.test_compute_budget import TEACHER, cfg_model, config

CPU = torch.device("cpu")
SMALL = {"pixel_memory": 4, "region_memory": 2, "pixel_contrast": 100, "region_contrast": 100}


def build(s_shape, t_shape, classes=3, **kw):
    torch.manual_seed(0)  # the head's initial weights and the bank's random start
    d = KD_METHODS.build(KD_METHODS.config_class("cirkd")(student_layers=["s"], teacher_layers=["t"], **kw))
    d.choose_layers([], [])
    d.setup({"s": torch.Size(s_shape)}, {"t": torch.Size(t_shape)})
    d.check_classes(classes)
    return d


def kd_batch(s, t, targets, classes=3):
    return KDBatch(torch.zeros(len(s), classes, 1, 1), targets, None, {"s": s}, {"t": t})


def rand(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def identity_head(d, channels):
    """The projection head as the identity on non-negative inputs (BN in eval mode at its initial state)."""
    conv1, bn, _ = d.head[0]
    with torch.no_grad():
        conv1.weight.copy_(torch.eye(channels)[:, :, None, None])
        d.head[1].weight.copy_(torch.eye(channels)[:, :, None, None])
    bn.eval()
    bn.running_var.fill_(1 - bn.eps)


def kl_rows(s_logits, t_logits):
    """sum_k p_t log(p_t / p_s) for each row, written with softmax and log."""
    p_t, p_s = t_logits.softmax(-1), s_logits.softmax(-1)
    return (p_t * (p_t.log() - p_s.log())).sum(-1)


def test_formula_written_out():
    s, t = rand(2, 3, 2, 2, seed=1), rand(2, 4, 4, 4, seed=2)
    targets = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    targets[0, 0, :3] = targets[1, 2, 1] = 255  # ignored positions are no anchors
    d = build(s.shape, t.shape, tau=0.5, **SMALL)
    d.eval()  # no push: the contrast set is the bank as it is, all of its slots (their order does not matter)
    out = d(kd_batch(s, t, targets))
    tau = 0.5
    up = F.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    u = [[up[n, :, p // 4, p % 4] / up[n, :, p // 4, p % 4].norm() for p in range(16)] for n in range(2)]
    v = [[t[n, :, p // 4, p % 4] / t[n, :, p // 4, p % 4].norm() for p in range(16)] for n in range(2)]
    pairs = []
    for i in range(2):
        for j in range(2):
            for p in range(16):
                s_row = torch.stack([u[i][p] @ u[j][q] for q in range(16)]) / tau
                t_row = torch.stack([v[i][p] @ v[j][q] for q in range(16)]) / tau
                pairs.append(kl_rows(s_row, t_row))
    torch.testing.assert_close(out["minibatch_pixel"], torch.stack(pairs).mean())
    # memory terms: the projection head by hand (conv1x1 -> BN in eval mode -> ReLU -> conv1x1)
    (conv1, bn, _), conv2 = d.head
    h = torch.einsum("oc,nchw->nohw", conv1.weight[:, :, 0, 0], s)
    h = (h - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    h = (h * bn.weight[:, None, None] + bn.bias[:, None, None]).relu()
    h = torch.einsum("oc,nchw->nohw", conv2.weight[:, :, 0, 0], h)
    h = F.interpolate(h, size=(4, 4), mode="bilinear", align_corners=False)
    for term, bank, weight in (
        ("memory_pixel", d.pixel_bank, 0.1),
        ("memory_region", d.region_bank, 0.1),
    ):
        memory = bank.queue.reshape(-1, 4)
        rows = []
        for n in range(2):
            for p in range(16):
                if targets[n, p // 4, p % 4] == 255:
                    continue
                a_s = h[n, :, p // 4, p % 4] / h[n, :, p // 4, p % 4].norm().clamp(
                    min=1e-12
                )  # as F.normalize
                rows.append(kl_rows(memory @ a_s / tau, memory @ v[n][p] / tau))
        torch.testing.assert_close(out[term], weight * torch.stack(rows).mean())


def test_pooled_to_max_side():
    s, t = rand(2, 3, 8, 8, seed=3), rand(2, 3, 8, 8, seed=4)
    targets = torch.zeros(2, 8, 8, dtype=torch.long)
    pooled = build(s.shape, t.shape, max_side=4, **SMALL).eval()
    plain = build(s.shape, t.shape, max_side=4, **SMALL).eval()
    a = pooled(kd_batch(s, t, targets))["minibatch_pixel"]
    b = plain(kd_batch(F.avg_pool2d(s, 2), F.avg_pool2d(t, 2), targets[:, ::2, ::2]))["minibatch_pixel"]
    torch.testing.assert_close(a, b)


def test_zero_when_student_embeddings_are_the_teachers():
    t = rand(3, 4, 4, 4, seed=5).relu() + 0.01
    targets = torch.randint(0, 3, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    d = build(t.shape, t.shape)
    identity_head(d, 4)
    d.head.train(False)
    out = d(kd_batch(t.clone(), t, targets))
    for name, value in out.items():
        assert abs(value.item()) < 1e-5, name
    assert d(kd_batch(t + rand(3, 4, 4, 4, seed=6), t, targets))["minibatch_pixel"] > 1e-3


def test_gradients_reach_student_and_head_not_teacher():
    s, t = rand(2, 3, 4, 4, seed=7, grad=True), rand(2, 5, 4, 4, seed=8, grad=True)
    d = build(s.shape, t.shape)
    d.train()
    sum(d(kd_batch(s, t, torch.randint(0, 3, (2, 4, 4)))).values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.head.parameters())


def test_defaults_and_kd_params():
    cfg = KD_METHODS.config_class("cirkd")()
    assert (cfg.tau, cfg.minibatch_weight, cfg.memory_pixel_weight, cfg.memory_region_weight) == (
        0.1,
        1.0,
        0.1,
        0.1,
    )
    assert (cfg.pixel_memory, cfg.region_memory, cfg.pixel_contrast, cfg.region_contrast) == (
        20000,
        2000,
        4096,
        1024,
    )
    assert (cfg.pixel_update, cfg.max_side, cfg.num_layers) == (16, 8, 1)
    d = build((2, 3, 4, 4), (2, 5, 4, 4), classes=11)
    assert d.extra_parameters() == 3 * 5 + 2 * 5 + 5 * 5  # two 1x1 convs without bias, BN's scale and shift
    assert d.pixel_bank.queue.shape == (11, 20000, 5) and d.region_bank.queue.shape == (11, 2000, 5)
    assert not d.pixel_bank.queue.requires_grad
    assert {"pixel_bank.queue", "region_bank.ptr", "pixel_bank.filled"} <= set(d.state_dict())


def test_errors_are_one_line():
    s, t = rand(2, 3, 4, 4), rand(2, 5, 4, 4)
    d = build(s.shape, t.shape)
    cases = [
        (lambda: d(KDBatch(torch.zeros(2, 3, 1, 1), torch.zeros(2, 4, 4), None, {}, {"t": t})), "no student"),
        (lambda: d(kd_batch(s, t, torch.zeros(2, dtype=torch.long))), "per-pixel targets"),
        (lambda: d(kd_batch(s.flatten(1), t.flatten(1), torch.zeros(2, 4, 4))), "feature maps"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as exc:
            call()
        assert "\n" not in str(exc.value)
    two = KD_METHODS.build(
        KD_METHODS.config_class("cirkd")(student_layers=["a", "b"], teacher_layers=["c", "d"])
    )
    two.choose_layers([], [])
    with pytest.raises(ValueError, match="one layer pair") as exc:
        two.setup({"a": s.shape, "b": s.shape}, {"c": t.shape, "d": t.shape})
    assert "\n" not in str(exc.value)


def test_memory_bank_fills_and_wraps():
    bank = MemoryBank(2, 5, 3)
    start = bank.queue.clone()
    assert torch.allclose(start.norm(dim=2), torch.ones(2, 5))  # random unit vectors, as the reference
    rows = torch.arange(21, dtype=torch.float).reshape(7, 3)
    bank.push(1, rows[:3])
    assert bank.filled.tolist() == [0, 3] and bank.ptr.tolist() == [0, 3]
    torch.testing.assert_close(bank.queue[1, :3], rows[:3])
    torch.testing.assert_close(bank.queue[0], start[0])  # other classes untouched
    bank.push(1, rows[3:7])  # wraps: slots 3, 4, 0, 1
    assert bank.filled.tolist() == [0, 5] and bank.ptr.tolist() == [0, 2]
    torch.testing.assert_close(bank.queue[1], torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    bank.push(0, rows)  # more rows than slots: the last five are kept
    assert bank.filled[0] == 5
    assert sorted(bank.queue[0, :, 0].tolist()) == sorted(rows[2:, 0].tolist())
    assert bank.sample(4).shape == (2 * 3, 3)  # 4 // 2 + 1 slots of each class


def test_push_per_image_and_class_only_in_training():
    t = rand(2, 4, 4, 4, seed=9)
    s = rand(2, 3, 4, 4, seed=10)
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    targets[0, :2] = 1
    targets[1] = 255
    targets[1, 0, 0] = 2
    d = build(s.shape, t.shape, pixel_update=3)
    d.eval()
    d(kd_batch(s, t, targets))
    assert d.pixel_bank.filled.sum() == 0 and d.region_bank.filled.sum() == 0
    d.train()
    d(kd_batch(s, t, targets))
    # image 0: classes 0 and 1 (8 pixels each, 3 drawn); image 1: class 2 (one pixel); 255 never
    assert d.region_bank.filled.tolist() == [1, 1, 1]
    assert d.pixel_bank.filled.tolist() == [3, 3, 1]
    v = F.normalize(t, dim=1)
    region = F.normalize(v[0, :, :2].flatten(1).mean(1), dim=0)
    torch.testing.assert_close(d.region_bank.queue[1, 0], region)
    torch.testing.assert_close(d.pixel_bank.queue[2, 0], v[1, :, 0, 0])
    class_one = v[0, :, :2].flatten(1).T
    for row in d.pixel_bank.queue[1, :3]:
        assert torch.isclose(class_one, row).all(1).any()  # pushed pixels are class-1 pixels of image 0


def train_cirkd(seed: int, epochs: int = 2):
    kd = {"method": "cirkd", "max_side": 4}
    cfg = config(epochs=epochs, train={"seed": seed}, kd=kd, teacher="not_loaded.yaml")
    data = load_data(cfg.data)
    seed_everything(seed)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    teacher = freeze(build_model(cfg_model(TEACHER), data.in_channels, data.num_classes))
    distiller = build_distiller(cfg, model, teacher, data, CPU)
    start = distiller.pixel_bank.queue.clone()
    no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    server, _ = serve_teacher(teacher, distiller.teacher_layers, data, cfg.train, CPU, no_amp, ("cirkd",))
    cost = measure_step_cost(model, distiller, server, teacher, data, cfg.train.batch_size, CPU)
    result = fit(model, data, cfg, device=CPU, distiller=distiller, teacher=server, cost=cost)
    return distiller, start, data, result, cost


def test_bank_is_kept_across_epochs_and_fresh_in_every_run():
    d, start, data, result, cost = train_cirkd(seed=0, epochs=2)
    assert result.state == "finished" and len(result.history) == 2
    assert {"train/minibatch_pixel", "train/memory_pixel", "train/memory_region"} <= set(result.history[0])
    assert cost.kd > 0  # the head and the similarity products are charged to train_flops
    # one region per image and labelled class per epoch, over both epochs: validation and the FLOP
    # measurement pushed nothing, and the epoch loop did not reset the bank
    labels = F.interpolate(data.train.targets[:, None].float(), size=(4, 4), mode="nearest")[:, 0].long()
    per_epoch = torch.zeros(data.num_classes, dtype=torch.long)
    for image in labels:
        for c in image[image != 255].unique():
            per_epoch[c] += 1
    assert d.region_bank.filled.tolist() == (2 * per_epoch).tolist()
    assert not torch.equal(d.pixel_bank.queue, start)
    again, start_again, *_ = train_cirkd(seed=0, epochs=1)
    assert again is not d and again.pixel_bank is not d.pixel_bank
    torch.testing.assert_close(start_again, start)  # a new run starts from the same seeded, empty bank
    assert again.region_bank.filled.tolist() == per_epoch.tolist()  # nothing carried over from the first
    other, start_other, *_ = train_cirkd(seed=1, epochs=1)
    assert not torch.equal(start_other, start)


def test_harness_error_names_the_method():
    kd = {"method": "cirkd", "student_layers": ["up.1", "up.0"], "teacher_layers": ["up.1", "up.0"]}
    cfg = config(epochs=1, kd=kd, teacher="not_loaded.yaml")
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    teacher = freeze(build_model(cfg_model(TEACHER), data.in_channels, data.num_classes))
    with pytest.raises(HarnessError, match="kd.method 'cirkd': cirkd: works on one layer pair") as exc:
        build_distiller(cfg, model, teacher, data, CPU)
    assert "\n" not in str(exc.value)
