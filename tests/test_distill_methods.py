"""Feature and relational KD methods: each loss against its paper's formula written out here, its minimum
when the student equals the teacher, where gradients go, clear errors, and a tiny end-to-end step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.distill import KD_METHODS, KDBatch
from harness.distill.triplet import image_labels, sample_negatives
from harness.models.taps import FeatureTap, probe_shapes
from harness.models.unet import UNet

FEATURE_METHODS = ["feature_cosine", "fitnet", "attention", "adaptation", "pairwise", "cwd", "rkd", "triplet"]


def build(method: str, s_shape=None, t_shape=None, **kw):
    """A distiller on one layer pair named 's' / 't' (set up when shapes are given)."""
    if method in ("cwd",) and kw.get("source", "logits") == "logits":
        d = KD_METHODS.build(KD_METHODS.config_class(method)(**kw))
        d.choose_layers([], [])
        d.setup({}, {})
        return d
    if kw.get("source") == "logits":
        d = KD_METHODS.build(KD_METHODS.config_class(method)(**kw))
    else:
        d = KD_METHODS.build(
            KD_METHODS.config_class(method)(student_layers=["s"], teacher_layers=["t"], **kw)
        )
    d.choose_layers([], [])
    if s_shape is not None:
        d.setup({"s": torch.Size(s_shape)}, {"t": torch.Size(t_shape)})
    return d


def kd_batch(s=None, t=None, s_logits=None, t_logits=None, targets=None):
    n = (s if s is not None else s_logits).shape[0]
    return KDBatch(
        student_logits=s_logits if s_logits is not None else torch.zeros(n, 3),
        targets=targets if targets is not None else torch.arange(n),
        teacher_logits=t_logits,
        student_features={} if s is None else {"s": s},
        teacher_features={} if t is None else {"t": t},
    )


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def total(terms):
    return sum(terms.values())


def identity_bn(bn: nn.BatchNorm2d):
    """Batch norm in eval mode that returns its input."""
    bn.eval()
    bn.running_mean.zero_()
    bn.running_var.fill_(1 - bn.eps)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


def prepared_adaptation(s_shape, t_shape, **kw):
    d = build("adaptation", s_shape, t_shape, **kw)
    d.prepared.fill_(True)  # skip training; the autoencoder keeps its random weights and scale 1
    d._freeze_if_prepared()
    return d


# --------------------------------------------------------------------------- formulas, written out


def test_feature_cosine_formula_with_adapter_and_resize():
    s, t = rand(3, 4, 4, 4, seed=1), rand(3, 6, 8, 8, seed=2)
    d = build("feature_cosine", s.shape, t.shape)
    conv = d.adapters[0]
    adapted = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], s) + conv.bias[None, :, None, None]
    adapted = F.interpolate(adapted, size=(8, 8), mode="bilinear", align_corners=False)
    expected = 0.0
    for n in range(3):
        a, b = adapted[n].reshape(-1), t[n].reshape(-1)
        expected += 1 - (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())
    torch.testing.assert_close(d(kd_batch(s, t))["cosine"], expected / 3)


def test_fitnet_formula_conv_bn_regressor():
    s, t = rand(4, 3, 5, 5, seed=1), rand(4, 6, 5, 5, seed=2)
    d = build("fitnet", s.shape, t.shape)
    conv, bn = d.regressors[0]
    y = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], s)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    expected = ((y - t) ** 2).sum() / t.numel()
    torch.testing.assert_close(d(kd_batch(s, t))["hint"], expected)
    assert d.cfg.beta == 100 and KD_METHODS.config_class("fitnet")(kernel_size=3).kernel_size == 3


def _at_reference(s, t):
    a = F.interpolate(s.pow(2).mean(1, keepdim=True), size=t.shape[-2:], mode="bilinear", align_corners=False)
    b = t.pow(2).mean(1, keepdim=True)
    out = 0.0
    for n in range(len(s)):
        qa, qb = a[n].reshape(-1), b[n].reshape(-1)
        qa, qb = qa / qa.norm(), qb / qb.norm()
        out += ((qa - qb) ** 2).sum()
    return out / (len(s) * b[0].numel())


def test_attention_formula_summed_over_stages():
    cfg = KD_METHODS.config_class("attention")(student_layers=["s", "s2"], teacher_layers=["t", "t2"])
    d = KD_METHODS.build(cfg)
    d.choose_layers([], [])
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 5, 8, 8, seed=2)
    s2, t2 = rand(2, 4, 6, 6, seed=3), rand(2, 8, 6, 6, seed=4)
    batch = KDBatch(torch.zeros(2, 3), torch.arange(2), None, {"s": s, "s2": s2}, {"t": t, "t2": t2})
    torch.testing.assert_close(d(batch)["at"], _at_reference(s, t) + _at_reference(s2, t2))
    assert cfg.beta == 1000 and cfg.p == 2


def test_pairwise_formula_maxpooled_nodes():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 5, 4, 4, seed=2)
    d = build("pairwise")  # pool_scale 0.5: 2x2 windows -> 2x2 = 4 nodes

    def sim_loop(x):
        out = torch.zeros(2, 4, 4)
        for n in range(2):
            nodes = [
                x[n, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].amax(dim=(1, 2))
                for i in range(2)
                for j in range(2)
            ]
            for a in range(4):
                for b in range(4):
                    out[n, a, b] = (nodes[a] @ nodes[b]) / (nodes[a].norm() * nodes[b].norm())
        return out

    expected = ((sim_loop(s) - sim_loop(t)) ** 2).sum() / 4**2 / 2
    torch.testing.assert_close(d(kd_batch(s, t))["pair"], expected)


def test_cwd_formula_on_logits():
    s, t = rand(2, 3, 4, 5, seed=1), rand(2, 3, 4, 5, seed=2)
    d = build("cwd")
    assert d.uses_teacher_logits and d.student_layers == [] and d.cfg.tau == 4 and d.cfg.beta == 3
    tau, expected = 4.0, 0.0
    for n in range(2):
        for c in range(3):
            p_t = torch.softmax(t[n, c].reshape(-1) / tau, 0)
            p_s = torch.softmax(s[n, c].reshape(-1) / tau, 0)
            expected += (p_t * (p_t.log() - p_s.log())).sum()
    expected = expected * tau**2 / (2 * 3)
    torch.testing.assert_close(d(kd_batch(s_logits=s, t_logits=t))["cwd"], expected)


def test_cwd_on_features_uses_adapter_and_resizes():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 6, 8, 8, seed=2)
    d = build("cwd", s.shape, t.shape, source="features")
    assert not d.uses_teacher_logits and d.extra_parameters() == 3 * 6 + 6
    conv = d.adapters[0]
    a = F.interpolate(conv(s), size=(8, 8), mode="bilinear", align_corners=False)
    p_t, log_p_s = torch.softmax(t.flatten(2) / 4, 2), torch.log_softmax(a.flatten(2) / 4, 2)
    expected = (p_t * (p_t.log() - log_p_s)).sum() * 16 / (2 * 6)
    torch.testing.assert_close(d(kd_batch(s, t))["cwd"], expected)


def _smooth_l1(x):
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


def _rkd_reference(s, t):
    n = len(s)

    def dist(e):
        d = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                d[i, j] = (e[i] - e[j]).norm() if i != j else 0.0
        return d / d[d > 0].mean()

    def angle(e):
        a = torch.zeros(n, n, n)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i != j and k != j:
                        u, v = e[i] - e[j], e[k] - e[j]
                        a[i, j, k] = (u @ v) / (u.norm() * v.norm())
        return a

    return 25 * _smooth_l1(dist(s) - dist(t)).mean(), 50 * _smooth_l1(angle(s) - angle(t)).mean()


def test_rkd_formula_on_pooled_features():
    s, t = rand(5, 3, 4, 4, seed=1), rand(5, 7, 2, 2, seed=2)
    d = build("rkd", s.shape, t.shape)
    assert not d.uses_teacher_logits and d.extra_parameters() == 0
    out = d(kd_batch(s, t))
    ref_d, ref_a = _rkd_reference(s.mean(dim=(2, 3)), t.mean(dim=(2, 3)))
    torch.testing.assert_close(out["rkd_distance"], ref_d)
    torch.testing.assert_close(out["rkd_angle"], ref_a)


def test_rkd_on_classification_logits():
    s, t = rand(6, 10, seed=1), rand(6, 10, seed=2) * 3
    d = build("rkd", source="logits")
    assert d.uses_teacher_logits and d.student_layers == []
    out = d(kd_batch(s_logits=s, t_logits=t))
    ref_d, ref_a = _rkd_reference(s, t)
    torch.testing.assert_close(out["rkd_distance"], ref_d)
    torch.testing.assert_close(out["rkd_angle"], ref_a)


def test_rkd_and_triplet_auto_source():
    """auto: features when the models name kd_layers (or the config names layers), else the logits."""
    for method in ("rkd", "triplet"):
        d = KD_METHODS.build(KD_METHODS.config_class(method)())
        d.choose_layers(["a", "b"], ["x", "y"])
        assert (d.student_layers, d.teacher_layers, d.uses_teacher_logits) == (["b"], ["y"], False)
        d = KD_METHODS.build(KD_METHODS.config_class(method)())
        d.choose_layers([], [])
        assert (d.student_layers, d.uses_teacher_logits) == ([], True)
        d = KD_METHODS.build(KD_METHODS.config_class(method)(source="features"))
        with pytest.raises(ValueError, match=f"{method}: source 'features'"):
            d.choose_layers([], [])


def test_triplet_formula():
    s, t = rand(6, 5, seed=1), rand(6, 5, seed=2)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    d = build("triplet", source="logits")
    torch.manual_seed(7)
    neg = sample_negatives(targets)
    torch.manual_seed(7)
    out = d(kd_batch(s_logits=s, t_logits=t, targets=targets))["triplet"]
    expected = 0.0
    for a in range(6):
        pos = ((t[a] - s[a]) ** 2).sum()
        far = ((t[a] - s[neg[a]]) ** 2).sum()
        expected += max(0.0, 1.0 + pos - far)
    torch.testing.assert_close(out, torch.as_tensor(expected / 6, dtype=out.dtype))


def test_triplet_on_features_with_linear_adapter():
    s, t = rand(4, 3, 4, 4, seed=1), rand(4, 6, 2, 2, seed=2)
    d = build("triplet", s.shape, t.shape)
    lin = d.adapters[0]
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (3, 6)
    targets = torch.tensor([1, 2, 1, 2])
    torch.manual_seed(3)
    neg = sample_negatives(targets)
    torch.manual_seed(3)
    out = d(kd_batch(s, t, targets=targets))["triplet"]
    es, et = lin(s.mean(dim=(2, 3))), t.mean(dim=(2, 3))
    expected = sum(
        torch.clamp(1 + ((et[a] - es[a]) ** 2).sum() - ((et[a] - es[neg[a]]) ** 2).sum(), min=0)
        for a in range(4)
    )
    torch.testing.assert_close(out, expected / 4)


def test_adaptation_formula():
    s, t = rand(2, 3, 8, 8, seed=1), rand(2, 6, 8, 8, seed=2).relu()
    d = prepared_adaptation(s.shape, t.shape, affinity_max_side=4)
    d.eval()
    out = d(kd_batch(s, t))
    code = d.autoencoder.encoder(t)  # three stride-2 convs: 8x8 -> 1x1
    assert code.shape[-2:] == (1, 1)
    code = code / code.pow(2).sum(1, keepdim=True).sqrt().clamp(min=1e-12)
    a = F.interpolate(d.adapter(s), size=code.shape[-2:], mode="bilinear", align_corners=False)
    a = a / a.pow(2).sum(1, keepdim=True).sqrt().clamp(min=1e-12)
    torch.testing.assert_close(out["adapt"], 50 * ((a - code) ** 2).mean())

    def affinity_loop(x):  # average-pooled 8x8 -> 4x4: m = 16 positions
        x = F.avg_pool2d(x, 2)
        v = x.flatten(2)
        out = torch.zeros(2, 16, 16)
        for n in range(2):
            for i in range(16):
                for j in range(16):
                    out[n, i, j] = (v[n, :, i] @ v[n, :, j]) / (v[n, :, i].norm() * v[n, :, j].norm())
        return out

    torch.testing.assert_close(out["affinity"], ((affinity_loop(s) - affinity_loop(t)) ** 2).mean())


# --------------------------------------------------------------------------- minimum at student == teacher


def _equal_case(method):
    """(distiller, batch) where the student's outputs equal the teacher's."""
    x = rand(4, 3, 4, 4, seed=5)
    if method == "cwd":
        return build("cwd"), kd_batch(s_logits=x.clone(), t_logits=x.clone())
    if method == "triplet":
        t = torch.eye(4) * 2  # negatives at squared distance 8 > margin
        return build("triplet", source="logits"), kd_batch(
            s_logits=t.clone(), t_logits=t, targets=torch.arange(4)
        )
    if method == "adaptation":
        d = prepared_adaptation((4, 3, 8, 8), (4, 3, 8, 8))
        d.adapter = d.autoencoder.encoder  # an adapter that reproduces the code
        x = rand(4, 3, 8, 8, seed=5)
        return d, kd_batch(x.clone(), x.clone())
    d = build(method, x.shape, x.shape)
    if method == "fitnet":
        conv, bn = d.regressors[0]
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3)[:, :, None, None])
        identity_bn(bn)
    return d, kd_batch(x.clone(), x.clone())


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_zero_when_student_equals_teacher(method):
    d, batch = _equal_case(method)
    for name, value in d(batch).items():
        torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-5, rtol=0, msg=f"{method}/{name}")


def test_feature_cosine_ignores_scale():
    x = rand(2, 3, 4, 4)
    d = build("feature_cosine", x.shape, x.shape)
    assert isinstance(d.adapters[0], nn.Identity) and d.extra_parameters() == 0
    torch.testing.assert_close(d(kd_batch(3 * x, x))["cosine"], torch.tensor(0.0), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- gradients


def _grad_case(method):
    s = rand(4, 3, 8, 8, seed=1, grad=True)
    t = rand(4, 6, 8, 8, seed=2, grad=True)  # as if the trainer forgot no_grad: the distiller must detach
    if method == "cwd":
        s, t = rand(4, 5, 8, 8, seed=1, grad=True), rand(4, 5, 8, 8, seed=2, grad=True)
        return build("cwd"), kd_batch(s_logits=s, t_logits=t), s, t
    if method == "adaptation":
        return prepared_adaptation(s.shape, t.shape), kd_batch(s, t), s, t
    return build(method, s.shape, t.shape), kd_batch(s, t, targets=torch.tensor([0, 1, 0, 1])), s, t


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_gradients_reach_student_and_adapters_not_teacher(method):
    d, batch, s, t = _grad_case(method)
    d.train()
    total(d(batch)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None, f"{method} lets gradients into the teacher's outputs"
    trainable = [p for p in d.parameters() if p.requires_grad]
    assert bool(trainable) == (method in ("feature_cosine", "fitnet", "adaptation", "triplet"))
    for p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in d.parameters():
        assert p.requires_grad or p.grad is None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["feature_cosine", "fitnet", "attention", "pairwise", "rkd", "triplet"])
def test_missing_feature_is_named(method):
    s, t = rand(2, 3, 4, 4), rand(2, 3, 4, 4)
    d = build(method, s.shape, t.shape)
    with pytest.raises(ValueError, match=rf"{method}: the batch has no teacher feature 't'"):
        d(KDBatch(torch.zeros(2, 3), torch.arange(2), None, {"s": s}, {"other": t}))
    with pytest.raises(ValueError, match=rf"{method}: no probed shape for student layer 's'"):
        d.setup({}, {"t": t.shape})


@pytest.mark.parametrize("method", ["attention", "pairwise", "adaptation"])
def test_vectors_where_maps_are_needed(method):
    if method == "adaptation":
        with pytest.raises(ValueError, match="adaptation: needs feature maps"):
            build(method, (2, 3), (2, 5))
        d = prepared_adaptation((2, 3, 8, 8), (2, 5, 8, 8))
    else:
        d = build(method)
    with pytest.raises(ValueError, match=rf"{method}: needs feature maps \(N, C, H, W\)"):
        d(kd_batch(rand(2, 3), rand(2, 5)))


def test_shape_errors_of_feature_pairs():
    d = build("feature_cosine", (2, 3, 4, 4), (2, 3, 4, 4))
    with pytest.raises(ValueError, match="feature_cosine: student feature .* do not pair up"):
        d(kd_batch(rand(2, 3, 4, 4), rand(3, 3, 4, 4)))
    with pytest.raises(ValueError, match="feature_cosine: .* same kind"):
        build("feature_cosine", (2, 3, 4, 4), (2, 3))
    d = KD_METHODS.build(KD_METHODS.config_class("fitnet")(student_layers=["s"], teacher_layers=["t"]))
    d.choose_layers([], [])
    with pytest.raises(ValueError, match="fitnet: adapters not built.*call setup"):
        d(kd_batch(rand(2, 3, 4, 4), rand(2, 3, 4, 4)))
    d = KD_METHODS.build(KD_METHODS.config_class("attention")())
    with pytest.raises(ValueError, match="attention: no layers chosen; call choose_layers"):
        d(kd_batch(rand(2, 3, 4, 4), rand(2, 3, 4, 4)))


def test_cwd_errors():
    d = build("cwd")
    with pytest.raises(ValueError, match="cwd: student predicts 3 classes but the teacher 4"):
        d(kd_batch(s_logits=rand(2, 3, 4, 4), t_logits=rand(2, 4, 4, 4)))
    with pytest.raises(ValueError, match="cwd: needs spatial logits.*response"):
        d(kd_batch(s_logits=rand(2, 3), t_logits=rand(2, 3)))
    with pytest.raises(ValueError, match="cwd: source 'logits' needs the teacher's logits"):
        d(kd_batch(s_logits=rand(2, 3, 4, 4)))
    with pytest.raises(ValueError, match="cwd: source 'logits' taps no layers"):
        KD_METHODS.config_class("cwd")(student_layers=["a"])


def test_relational_errors():
    with pytest.raises(ValueError, match="rkd: 2 student samples but 3 teacher samples"):
        build("rkd", source="logits")(kd_batch(s_logits=rand(2, 5), t_logits=rand(3, 5)))
    d = build("triplet", source="logits")
    with pytest.raises(ValueError, match="triplet: student embedding .* same classes"):
        d(kd_batch(s_logits=rand(4, 5), t_logits=rand(4, 6), targets=torch.arange(4)))
    with pytest.raises(ValueError, match="triplet: 3 targets for 4 samples"):
        d(kd_batch(s_logits=rand(4, 5), t_logits=rand(4, 5), targets=torch.arange(3)))
    with pytest.raises(ValueError, match="rkd: source 'logits' taps no layers"):
        KD_METHODS.config_class("rkd")(source="logits", student_layers=["a"])


def test_adaptation_errors():
    with pytest.raises(ValueError, match="adaptation: works on one layer pair"):
        KD_METHODS.config_class("adaptation")(student_layers=["a", "b"], teacher_layers=["c", "d"])
    d = build("adaptation", (2, 3, 8, 8), (2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"adaptation: the autoencoder is untrained; call distiller.prepare"):
        d(kd_batch(rand(2, 3, 8, 8), rand(2, 5, 8, 8)))
    with pytest.raises(ValueError, match="adaptation: prepare needs teacher feature 't'"):
        d.prepare(lambda: [kd_batch(None, None, s_logits=rand(2, 3))], torch.device("cpu"))
    with pytest.raises(ValueError, match="adaptation: prepare got no batches"):
        d.prepare(lambda: [], torch.device("cpu"))


# --------------------------------------------------------------------------- adaptation's autoencoder


def test_adaptation_prepare_trains_then_freezes_the_autoencoder():
    cfg = dict(ae_lr=0.1)
    d = build("adaptation", (8, 3, 8, 8), (8, 6, 8, 8), **cfg)
    assert (d.cfg.adapt_weight, d.cfg.affinity_weight, d.cfg.sparsity_weight) == (50, 1, 1e-7)
    assert (d.cfg.ae_weight_decay, d.cfg.ae_epochs, d.cfg.affinity_max_side) == (1e-4, 1, 32)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, 8, generator=g)
    feats = [(base + 0.3 * torch.randn(8, 6, 8, 8, generator=g)).relu() * 5 for _ in range(30)]

    def teacher_batches():
        return [KDBatch(torch.empty(0), torch.zeros(8), None, {}, {"t": f}) for f in feats]

    def recon():
        with torch.no_grad():
            return sum(d.autoencoder.losses(f)[0] for f in feats) / len(feats)

    before_params = d.extra_parameters()
    metrics = d.prepare(teacher_batches, torch.device("cpu"))
    assert set(metrics) == {"ae/recon_first", "ae/recon"} and metrics["ae/recon"] < metrics["ae/recon_first"]
    assert recon() < 0.8 * metrics["ae/recon_first"]  # over all 30 batches, not just the last
    assert all(not p.requires_grad for p in d.autoencoder.parameters())
    assert d.extra_parameters() == before_params - sum(p.numel() for p in d.autoencoder.parameters())
    d.train()
    assert not d.autoencoder.training and d.adapter.training
    frozen = {k: v.clone() for k, v in d.autoencoder.state_dict().items()}
    s = rand(8, 3, 8, 8, grad=True)
    total(d(KDBatch(torch.empty(0), torch.zeros(8), None, {"s": s}, {"t": feats[0]}))).backward()
    assert all(p.grad is None for p in d.autoencoder.parameters())
    assert all(torch.equal(v, d.autoencoder.state_dict()[k]) for k, v in frozen.items())
    # a restored distiller knows it was prepared
    e = build("adaptation", (8, 3, 8, 8), (8, 6, 8, 8))
    e.load_state_dict(d.state_dict())
    assert set(e(KDBatch(torch.empty(0), torch.zeros(8), None, {"s": s}, {"t": feats[0]}))) == {
        "adapt",
        "affinity",
    }


# --------------------------------------------------------------------------- triplet sampler


def test_sample_negatives_picks_other_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (32,), generator=g)
    for seed in range(5):
        neg = sample_negatives(labels, torch.Generator().manual_seed(seed))
        assert (neg >= 0).all() and (labels[neg] != labels).all()
    again = sample_negatives(labels, torch.Generator().manual_seed(4))
    assert torch.equal(neg, again)
    neg = sample_negatives(torch.tensor([1, 1, 2]), torch.Generator().manual_seed(0))
    assert neg[2] in (0, 1) and neg[0] == 2 and neg[1] == 2
    assert (sample_negatives(torch.tensor([4, 4, 4])) == -1).all()


def test_segmentation_labels_are_majority_foreground_class():
    masks = torch.zeros(4, 4, 4, dtype=torch.long)
    masks[0, :2] = 3
    masks[0, 2, :3] = 5  # 8 pixels of 3, 3 of 5, background the rest
    masks[1] = 255
    masks[1, 0, 0] = 0  # only background and ignore
    masks[2] = 255  # nothing labelled
    masks[3, 0, :2], masks[3, 1, :2] = 7, 2  # a tie: the lower class
    assert image_labels(masks).tolist() == [3, 0, -1, 2]
    assert image_labels(masks, background=None).tolist() == [3, 0, -1, 0]
    neg = sample_negatives(masks, torch.Generator().manual_seed(0))
    assert neg[2] == -1 and neg[0] in (1, 3) and neg[1] in (0, 3) and neg[3] in (0, 1)


def test_triplet_without_any_negative_is_zero():
    d = build("triplet", source="logits")
    s = rand(3, 4, grad=True)
    out = d(kd_batch(s_logits=s, t_logits=rand(3, 4, seed=1), targets=torch.tensor([2, 2, 2])))["triplet"]
    assert out.item() == 0.0
    out.backward()


# --------------------------------------------------------------------------- configs


def test_config_defaults_and_parsing():
    cfg = KD_METHODS.config_class("rkd").model_validate({"method": "rkd"})
    assert (cfg.distance_weight, cfg.angle_weight, cfg.source) == (25, 50, "auto")
    assert KD_METHODS.config_class("triplet")().margin == 1.0
    assert KD_METHODS.config_class("pairwise")().pool_scale == 0.5
    for method in FEATURE_METHODS:
        assert method in KD_METHODS.names()
        with pytest.raises(ValueError):
            KD_METHODS.config_class(method)(no_such_field=1)


# --------------------------------------------------------------------------- end to end on tiny UNets


@pytest.mark.parametrize(
    "method", sorted(set(KD_METHODS.names()) - {"none", "combo"})
)  # combo: test_combo.py
def test_end_to_end_step_on_tiny_unets(method):
    torch.manual_seed(0)
    student, teacher = UNet(1, 11, width=2, depth=3), UNet(1, 11, width=4, depth=3).eval()
    teacher.requires_grad_(False)
    x = torch.rand(4, 1, 16, 16)
    y = torch.zeros(4, 16, 16, dtype=torch.long)
    for i in range(4):
        y[i, 4:12, 4:12] = i + 1  # each image its own digit class
    d = KD_METHODS.build(KD_METHODS.config_class(method)())
    d.choose_layers(student.kd_layers, teacher.kd_layers)
    d.setup(probe_shapes(student, d.student_layers, x[:2]), probe_shapes(teacher, d.teacher_layers, x[:2]))

    def teacher_outputs(xb):
        with torch.no_grad(), FeatureTap(teacher, d.teacher_layers) as tap:
            logits = teacher(xb)
        return logits, dict(tap.features)

    def teacher_batches():
        for _ in range(3):
            logits, feats = teacher_outputs(x)
            yield KDBatch(torch.empty(0), y, logits, {}, feats)

    metrics = d.prepare(teacher_batches, torch.device("cpu"))
    assert all(math.isfinite(v) for v in metrics.values())
    before = [p.detach().clone() for p in student.parameters()]
    params = list(student.parameters()) + [p for p in d.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    t_logits, t_feats = teacher_outputs(x)
    student.train()
    d.train()
    with FeatureTap(student, d.student_layers) as tap:
        logits = student(x)
    terms = d(KDBatch(logits, y, t_logits, tap.features, t_feats))
    assert terms and all(name.replace("_", "").isalpha() for name in terms)
    loss = F.cross_entropy(logits, y) + d.cfg.beta * total(terms)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
