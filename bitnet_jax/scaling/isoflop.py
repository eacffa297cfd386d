"""Isoflop analysis (Chinchilla approach 2): a parabola of L against log N per compute budget,
then N*(C) = k C^a and D* = C / (6 N*). numpy and scipy only, like `laws`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from scipy import stats

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import DEFAULT_N_BOOT
from bitnet_jax.scaling.laws import _check_inputs, _percentile_interval, summary_lines

__all__ = ["IsoflopFit", "fit_isoflop"]

@dataclass(frozen=True, eq=False)
class IsoflopFit:
    """Per-budget loss minima and the law `N*(C) = k C^a`, `D*(C) = C / (6 N*)`.

    `parabolas[i]` are (c2, c1, c0) of `L = c2 u^2 + c1 u + c0`, u = ln N - `centres[i]`.
    `r2` is that of the log-log fit of N* on C. `samples` rows are (k, a) of bootstrap refits.
    """

    budgets: np.ndarray
    n_opt: np.ndarray
    loss_opt: np.ndarray
    n_points: tuple[int, ...]
    parabolas: tuple[tuple[float, float, float], ...]
    centres: tuple[float, ...]
    k: float
    a: float
    r2: float
    warnings: tuple[str, ...] = ()
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: Optional[float] = None
    samples: Optional[np.ndarray] = None
    n_boot_failed: int = 0
    form: str = "N*(C) = k * C^a,  D*(C) = C / (6 N*(C))"

    @property
    def d_opt(self) -> np.ndarray:
        return self.budgets / (6 * self.n_opt)

    @property
    def params(self) -> dict[str, float]:
        """k and a of N* = k C^a, and b = 1 - a of D* = C^b / (6 k)."""
        return {"k": self.k, "a": self.a, "b": 1 - self.a}

    def predict_n_opt(self, C: Any) -> np.ndarray:
        return self.k * np.asarray(C, dtype=float) ** self.a

    def predict_d_opt(self, C: Any) -> np.ndarray:
        return np.asarray(C, dtype=float) / (6 * self.predict_n_opt(C))

    def summary(self) -> str:
        details = [f"  C = {c:.3g}: N* = {n_opt:.4g}, D* = {c / (6 * n_opt):.4g}, "
                   f"L* = {l_opt:.4f} ({m} runs)"
                   for c, n_opt, l_opt, m in zip(self.budgets, self.n_opt, self.loss_opt,
                                                 self.n_points)]
        return summary_lines(f"{self.form}    ({len(self.budgets)} budgets)", self.params,
                             self.intervals, self.level, details, self.warnings)

    def __str__(self) -> str:
        return self.summary()


def _group_budgets(C: np.ndarray, rel_tol: float,
                   log_bin_width: Optional[float]) -> list[np.ndarray]:
    """Indices of runs per compute budget: equal within `rel_tol`, or in bins of
    `log_bin_width` decades of C centred on multiples of it."""
    log_c = np.log10(C)
    if log_bin_width is not None:
        if not log_bin_width > 0:
            raise ConfigError(f"log_bin_width must be positive (decades), got {log_bin_width!r}")
        # Bins centred on multiples of the width: budgets are usually round numbers (1e18, 1e19),
        # which would sit on bin edges with floor().
        labels = np.round(log_c / log_bin_width)
    else:
        order = np.argsort(log_c, kind="stable")
        breaks = np.diff(log_c[order]) > np.log10(1 + rel_tol)
        labels = np.empty(len(C))
        labels[order] = np.concatenate([[0], np.cumsum(breaks)])
    return [np.flatnonzero(labels == lab) for lab in np.unique(labels)]


def _parabola_minimum(log_n: np.ndarray, loss: np.ndarray
                      ) -> Optional[tuple[float, float, tuple[float, float, float], float]]:
    """(ln N*, L*, coefficients, centre) of the least-squares parabola in ln N, or None when it
    has fewer than 3 distinct N or opens downwards."""
    if len(np.unique(log_n)) < 3:
        return None
    centre = float(log_n.mean())  # centring keeps polyfit's Vandermonde well conditioned
    c2, c1, c0 = np.polyfit(log_n - centre, loss, 2)  # numpy's least squares, not our own
    if not c2 > 0:
        return None
    u = -c1 / (2 * c2)
    return centre + u, c0 - c1 ** 2 / (4 * c2), (float(c2), float(c1), float(c0)), centre


def _isoflop_line(log_c: np.ndarray, log_n_opt: np.ndarray) -> tuple[float, float, float]:
    """(k, a, r2) of ln N* = ln k + a ln C (scipy's linregress)."""
    reg = stats.linregress(log_c, log_n_opt)
    return float(np.exp(reg.intercept)), float(reg.slope), float(reg.rvalue ** 2)


def fit_isoflop(N: Any, C: Any, L: Any, *, rel_tol: float = 1e-3,
                log_bin_width: Optional[float] = None, min_points: int = 3,
                n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95) -> IsoflopFit:
    """Isoflop analysis (Chinchilla approach 2).

    Runs are grouped by compute budget C (values equal within `rel_tol`, or bins of
    `log_bin_width` decades centred on multiples of it). Per budget with >= `min_points` runs
    (>= 3), a least-squares parabola of L against ln N gives the minimum N*(C); budgets whose
    parabola opens downwards are skipped with a warning, minima outside the sampled N range are
    kept with one. Then
    ln N* = ln k + a ln C by least squares (>= 2 budgets), and D* = C / (6 N*).
    Intervals: a stratified bootstrap (runs resampled within each budget, `n_boot` times; 0 to
    skip) refits every parabola and the line.
    """
    n, c, loss = _check_inputs(("N", "C", "L"), (N, C, L), 2, "isoflop", {"N": 3, "C": 2})
    if min_points < 3:
        raise ConfigError(f"min_points must be >= 3 (a parabola has 3 coefficients), "
                          f"got {min_points}")
    log_n = np.log(n)
    warnings: list[str] = []
    budgets, n_opt, l_opt, counts, coefs, centres, groups = [], [], [], [], [], [], []
    for idx in _group_budgets(c, rel_tol, log_bin_width):
        budget = float(np.exp(np.mean(np.log(c[idx]))))  # geometric mean of the group
        if len(idx) < min_points:
            warnings.append(f"C = {budget:.3g}: {len(idx)} run(s), fewer than {min_points}; "
                            "skipped")
            continue
        found = _parabola_minimum(log_n[idx], loss[idx])
        if found is None:
            warnings.append(f"C = {budget:.3g}: no convex parabola (too few distinct N, or the "
                            "loss is not U-shaped in log N); skipped")
            continue
        x_opt, loss_min, coef, centre = found
        if not log_n[idx].min() <= x_opt <= log_n[idx].max():
            warnings.append(f"C = {budget:.3g}: the minimum N* = {math.exp(x_opt):.3g} lies "
                            "outside the sampled sizes (extrapolated)")
        budgets.append(budget)
        n_opt.append(math.exp(x_opt))
        l_opt.append(loss_min)
        counts.append(len(idx))
        coefs.append(coef)
        centres.append(centre)
        groups.append(idx)
    if len(budgets) < 2:
        raise ConfigError(f"isoflop needs at least 2 compute budgets with >= {min_points} runs "
                          f"and a convex parabola each, found {len(budgets)}; "
                          + "; ".join(warnings))
    log_budgets = np.log(budgets)
    k, a, r2 = _isoflop_line(log_budgets, np.log(n_opt))
    result = IsoflopFit(budgets=np.array(budgets), n_opt=np.array(n_opt),
                        loss_opt=np.array(l_opt), n_points=tuple(counts),
                        parabolas=tuple(coefs), centres=tuple(centres), k=k, a=a, r2=r2,
                        warnings=tuple(warnings))
    if not n_boot:
        return result
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(int(n_boot)):
        xs, ys = [], []
        for log_b, idx in zip(log_budgets, groups):
            pick = idx[rng.integers(0, len(idx), size=len(idx))]
            found = _parabola_minimum(log_n[pick], loss[pick])
            if found is not None:
                xs.append(log_b)
                ys.append(found[0])
        if len(xs) >= 2:
            rows.append(_isoflop_line(np.array(xs), np.array(ys))[:2])
    samples = np.array(rows).reshape(-1, 2)
    failed = int(n_boot) - len(samples)
    if len(samples) < 2:
        return dataclasses.replace(result, n_boot_failed=failed, warnings=(
            *warnings, "the bootstrap found too few usable resamples: no intervals"))
    lo, hi = _percentile_interval(samples, level)
    intervals = {"k": (float(lo[0]), float(hi[0])), "a": (float(lo[1]), float(hi[1])),
                 "b": (float(1 - hi[1]), float(1 - lo[1]))}
    if failed > 0.05 * n_boot:
        warnings.append(f"{failed} of {n_boot} bootstrap resamples were unusable")
    return dataclasses.replace(result, intervals=intervals, level=level, samples=samples,
                               n_boot_failed=failed, warnings=tuple(warnings))
