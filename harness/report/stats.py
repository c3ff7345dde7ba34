"""Small statistics: bootstrap intervals for a difference over seeds, and Pareto fronts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
RNG_SEED = 0


@dataclass
class Difference:
    """Mean of ``a - b`` with a percentile bootstrap interval; ``low``/``high`` are NaN when it can't be had."""

    diff: float
    low: float
    high: float
    n_a: int
    n_b: int
    paired: int  # seeds both sides have (0: the groups were resampled independently)

    @property
    def computable(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.computable and (self.low > 0 or self.high < 0)


def bootstrap_difference(
    a: dict[int, float],
    b: dict[int, float],
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = RNG_SEED,
) -> Difference:
    """Difference of means between seed -> value maps ``a`` and ``b``.

    With two or more seeds in common the seed-paired differences are resampled (same student, same seed:
    the pairing removes the seed's own luck); otherwise each side is resampled on its own when both have
    at least two seeds. With fewer, the interval is undefined (NaN) rather than a made-up zero width."""
    rng = np.random.default_rng(seed)
    common = sorted(set(a) & set(b))
    va, vb = np.array(list(a.values()), float), np.array(list(b.values()), float)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    nan = float("nan")
    if len(common) >= 2:
        d = np.array([a[s] - b[s] for s in common])
        means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
        low, high = np.percentile(means, [lo_q, hi_q])
        return Difference(float(d.mean()), float(low), float(high), len(a), len(b), len(common))
    diff = float(va.mean() - vb.mean()) if len(va) and len(vb) else nan
    if len(va) >= 2 and len(vb) >= 2:
        ma = va[rng.integers(0, len(va), size=(resamples, len(va)))].mean(axis=1)
        mb = vb[rng.integers(0, len(vb), size=(resamples, len(vb)))].mean(axis=1)
        low, high = np.percentile(ma - mb, [lo_q, hi_q])
        return Difference(diff, float(low), float(high), len(a), len(b), 0)
    return Difference(diff, nan, nan, len(a), len(b), len(common))


def pareto_front(cost, quality, maximize: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats: cost no higher and quality no worse, one strictly.
    NaN points are never on the front."""
    cost = np.asarray(cost, float)
    q = np.asarray(quality, float) * (1 if maximize else -1)
    ok = np.isfinite(cost) & np.isfinite(q)
    front = np.zeros(len(cost), bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = others & (cost <= cost[i]) & (q >= q[i]) & ((cost < cost[i]) | (q > q[i]))
        front[i] = not dominated.any()
    return front
