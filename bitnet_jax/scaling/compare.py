"""Recipes compared through their fitted laws: loss ratio, effective parameter multiplier (with
bootstrap bands) and loss against a resource (weight memory, inference energy). numpy and scipy
only, like `laws`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
from scipy import optimize

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import bootstrap_fit
from bitnet_jax.scaling.laws import (_LAWS, Fit, _percentile_interval, fit_power_law,
                                     fit_power_law_with_offset)

__all__ = ["Band", "loss_ratio", "loss_ratio_band", "effective_parameter_multiplier",
           "effective_parameter_multiplier_band", "fit_loss_vs_resource", "ResourceComparison",
           "loss_vs_resource"]

@dataclass(frozen=True, eq=False)
class Band:
    """A comparison curve over x with its bootstrap percentile band."""

    x: np.ndarray
    value: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: float


def _comparison_xs(fit: Fit, N: Any, D: Any) -> tuple[np.ndarray, ...]:
    if fit.law == "chinchilla":
        if D is None:
            raise ConfigError(f"{fit.form} needs D: pass D=... to compare at a data size")
        return np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return (np.asarray(N, dtype=float),)


def loss_ratio(fit_q: Fit, fit_ref: Fit, N: Any, D: Any = None) -> np.ndarray:
    """L_q(N) / L_ref(N): above 1 where the recipe q is worse at the same size (or resource)."""
    return fit_q.predict(*_comparison_xs(fit_q, N, D)) / \
        fit_ref.predict(*_comparison_xs(fit_ref, N, D))


def _size_for_loss(law: str, p: Mapping[str, Any], loss: np.ndarray, D: Any) -> np.ndarray:
    """x at which the law `p` predicts `loss`: x = (A / (L - E'))^(1/alpha), E' = E (plus
    B D^-beta for L(N, D) at fixed D); NaN where L <= E' (the reference never gets there)."""
    floor = p.get("E", 0.0)
    if law == "chinchilla":
        floor = floor + np.exp(np.log(p["B"]) - p["beta"] * np.log(np.asarray(D, dtype=float)))
    gap = loss - floor
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        size = np.exp((np.log(p["A"]) - np.log(np.where(gap > 0, gap, np.nan))) / p["alpha"])
    return np.where(gap > 0, size, np.nan)


def effective_parameter_multiplier(fit_q: Fit, fit_ref: Fit, N: Any, D: Any = None) -> np.ndarray:
    """N_ref / N: the reference size whose predicted loss equals recipe q's loss at N, over N.

    Below 1: q is worth fewer reference parameters (a ternary model of N parameters matches a
    bf16 model of N * multiplier). Solved analytically for the reference's law E + A N^-alpha
    (E = 0 for the pure power law; E + B D^-beta at fixed D for L(N, D)); NaN where q's loss is at
    or below the reference's floor. Works for any resource x in place of N (see
    `loss_vs_resource`).
    """
    n = np.asarray(N, dtype=float)
    target = fit_q.predict(*_comparison_xs(fit_q, n, D))
    return _size_for_loss(fit_ref.law, fit_ref.params, target, D) / n


def _paired_samples(fit_q: Fit, fit_ref: Fit) -> tuple[dict, dict]:
    """Bootstrap parameter samples of both fits, paired by index (independent draws: `fit_table`
    bootstraps each recipe from its own stream)."""
    q, ref = fit_q.sample_params(), fit_ref.sample_params()
    m = min(len(fit_q.samples), len(fit_ref.samples))
    return {k: v[:m] for k, v in q.items()}, {k: v[:m] for k, v in ref.items()}


def _column(p: Mapping[str, np.ndarray], ndim: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(-1, *(1,) * ndim) for k, v in p.items()}


def loss_ratio_band(fit_q: Fit, fit_ref: Fit, N: Any, D: Any = None,
                    level: float = 0.95) -> Band:
    """`loss_ratio` with a percentile band over paired bootstrap fits of both recipes."""
    n = np.asarray(N, dtype=float)
    q, ref = _paired_samples(fit_q, fit_ref)
    xs_q, xs_ref = _comparison_xs(fit_q, n, D), _comparison_xs(fit_ref, n, D)
    ratios = _LAWS[fit_q.law][1](_column(q, n.ndim), *xs_q) / \
        _LAWS[fit_ref.law][1](_column(ref, n.ndim), *xs_ref)
    lo, hi = _percentile_interval(ratios, level)
    return Band(n, loss_ratio(fit_q, fit_ref, n, D), lo, hi, level)


def effective_parameter_multiplier_band(fit_q: Fit, fit_ref: Fit, N: Any, D: Any = None,
                                        level: float = 0.95) -> Band:
    """`effective_parameter_multiplier` with a percentile band over paired bootstrap fits.

    A bootstrap pair whose q loss is below the reference floor counts as an infinite multiplier
    (the reference never reaches it), so `hi` may be inf; percentiles then use the inverted CDF
    (an order statistic) so that inf is handled exactly.
    """
    n = np.asarray(N, dtype=float)
    q, ref = _paired_samples(fit_q, fit_ref)
    target = _LAWS[fit_q.law][1](_column(q, n.ndim), *_comparison_xs(fit_q, n, D))
    mult = _size_for_loss(fit_ref.law, _column(ref, n.ndim), target, D) / n
    lo, hi = _percentile_interval(np.where(np.isnan(mult), np.inf, mult), level,
                                  method="inverted_cdf")
    return Band(n, effective_parameter_multiplier(fit_q, fit_ref, n, D), lo, hi, level)


def fit_loss_vs_resource(x: Any, L: Any, *, resource: str = "weight_bytes", offset: bool = True,
                         robust: Optional[float] = None) -> Fit:
    """L against a resource x (weight memory in bytes, inference energy per token, ...):
    `L(x) = E + A x^-alpha` (or `A x^-alpha` with `offset=False`), the same fitters as L(N)."""
    if offset:
        return fit_power_law_with_offset(x, L, robust=robust, x_name=resource)
    return fit_power_law(x, L, x_name=resource)


@dataclass(frozen=True, eq=False)
class ResourceComparison:
    """Recipes against a reference on one resource axis.

    On the grid `x` (the overlap of the recipes' observed ranges): `ratio[r]` = L_r / L_ref,
    `multiplier[r]` = x_ref / x, the resource the reference needs for recipe r's loss over what r
    uses (> 1: r wins), `wins[r]` where r has the lower loss, `crossovers[r]` the x values where
    the two predicted losses are equal.
    """

    resource: str
    reference: str
    fits: dict[str, Fit]
    x: np.ndarray
    ratio: dict[str, np.ndarray]
    multiplier: dict[str, np.ndarray]
    wins: dict[str, np.ndarray]
    crossovers: dict[str, tuple[float, ...]]

    def summary(self) -> str:
        lines = [f"loss vs {self.resource} (reference {self.reference}):"]
        for recipe, fit in self.fits.items():
            lines.append(f"[{recipe}] " + fit.summary().replace("\n", "\n  "))
        for recipe, wins in self.wins.items():
            share = f"{100 * wins.mean():.0f}% of the range"
            lines.append(f"{recipe} vs {self.reference}: lower loss at the same {self.resource} "
                         f"on {share}; {self.reference} needs "
                         f"{_fmt_range(self.multiplier[recipe])} x the {self.resource}; "
                         f"crossovers at {[f'{c:.4g}' for c in self.crossovers[recipe]] or 'none'}")
        return "\n".join(lines)


def _fmt_range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "(undefined)"
    return f"{finite.min():.3g}-{finite.max():.3g}"


def _crossovers(f: Callable[[np.ndarray], np.ndarray], grid: np.ndarray) -> tuple[float, ...]:
    """Roots of f on the grid: each sign change refined by scipy's brentq."""
    values = f(grid)
    roots = []
    for i in np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0):
        roots.append(float(optimize.brentq(lambda t: float(f(np.array(t))), grid[i], grid[i + 1])))
    return tuple(roots)


def loss_vs_resource(data: Mapping[str, tuple[Any, Any]], *, resource: str = "weight_bytes",
                     reference: str = "bf16", offset: bool = True, n_boot: int = 0,
                     seed: int = 0, n_grid: int = 200) -> ResourceComparison:
    """Fit L(x) per recipe (`data[recipe] = (x, L)`) and compare each with `reference`.

    The same power-law fitter as L(N) applied to x = weight memory or energy per token, so a
    report can show where ternary wins: a lower loss for the same bytes or joules. `n_boot` > 0
    adds bootstrap intervals to each fit.
    """
    if reference not in data:
        raise ConfigError(f"reference recipe {reference!r} not in the data "
                          f"(recipes: {sorted(data)})")
    fits = {}
    for recipe, (x, loss) in data.items():
        fit = fit_loss_vs_resource(x, loss, resource=resource, offset=offset)
        fits[recipe] = bootstrap_fit(fit, n_boot=n_boot, seed=seed) if n_boot else fit
    lo = max(float(f.data[0].min()) for f in fits.values())
    hi = min(float(f.data[0].max()) for f in fits.values())
    if lo >= hi:  # no overlap: compare over the union instead, which extrapolates
        lo = min(float(f.data[0].min()) for f in fits.values())
        hi = max(float(f.data[0].max()) for f in fits.values())
    grid = np.geomspace(lo, hi, n_grid)
    ref = fits[reference]
    ratio, mult, wins, cross = {}, {}, {}, {}
    for recipe, fit in fits.items():
        if recipe == reference:
            continue
        ratio[recipe] = loss_ratio(fit, ref, grid)
        mult[recipe] = effective_parameter_multiplier(fit, ref, grid)
        wins[recipe] = ratio[recipe] < 1
        cross[recipe] = _crossovers(lambda t, fit=fit: fit.predict(t) - ref.predict(t), grid)
    return ResourceComparison(resource, reference, fits, grid, ratio, mult, wins, cross)
