"""Bootstrap intervals for the fits of `laws`: every parameter and every prediction.

`bootstrap_fit` resamples a fit's points with replacement and refits every resample from the
point estimate, giving percentile intervals for every parameter (`Fit.intervals`) and for
predictions (`Fit.prediction_interval`); `bootstrap` fits and bootstraps in one call.
numpy and scipy only, like `laws`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.laws import (_LAWS, Fit, _lbfgs, _offset_solve, _one_blas_thread,
                                     _params_to_theta, _percentile_interval, _power_law_params,
                                     _theta_to_params)

__all__ = ["DEFAULT_N_BOOT", "bootstrap_fit", "bootstrap"]

# The one default of every bootstrap: `bitnet fit`, `bitnet sweep report` and the fitters.
DEFAULT_N_BOOT = 1000  # Epoch used 4000; 1000 keeps a Chinchilla bootstrap to a few seconds

# Each law has a fast refit from the point estimate: one L-BFGS (Chinchilla) or one least-squares
# start (L(N) with offset) instead of the whole grid. The resampled data sit near the original, so
# their optimum sits near the point estimate: this is what makes thousands of Chinchilla
# bootstraps affordable (a few ms each instead of ~20 s for the grid).

def _refit_power_law(data: tuple[np.ndarray, ...], point: Fit) -> Optional[np.ndarray]:
    x, loss = data
    if np.ptp(np.log(x)) == 0:
        return None
    p = _power_law_params(x, loss)
    return np.array([p["A"], p["alpha"]])


def _refit_offset(data: tuple[np.ndarray, ...], point: Fit) -> Optional[np.ndarray]:
    x, loss = data
    if len(np.unique(x)) < 3:
        return None
    p, _, _, _ = _offset_solve(x, loss, [(point.params["E"], point.params["alpha"])],
                               point.options.get("robust"))
    return np.array([p["E"], p["A"], p["alpha"]])


def _refit_chinchilla(data: tuple[np.ndarray, ...], point: Fit) -> Optional[np.ndarray]:
    n, d, loss = data
    if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
        return None
    args = (np.log(n), np.log(d), np.log(loss), point.options["huber_delta"])
    res = _lbfgs(_params_to_theta(point.params), args, tight=True)
    if not (np.isfinite(res.fun) and np.all(np.isfinite(res.x))):
        return None
    p = _theta_to_params(res.x)
    return np.array([p[k] for k in _LAWS["chinchilla"][0]])


_REFIT: dict[str, Callable[[tuple[np.ndarray, ...], Fit], Optional[np.ndarray]]] = {
    "power_law": _refit_power_law,
    "power_law_offset": _refit_offset,
    "chinchilla": _refit_chinchilla,
}


def bootstrap_fit(point: Fit, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                  level: float = 0.95,
                  resample: Optional[Callable[[np.random.Generator], tuple[np.ndarray, ...]]]
                  = None) -> Fit:
    """`point` with bootstrap samples and percentile intervals for every parameter.

    Resamples the fitted points (`point.data`) with replacement `n_boot` times (numpy's PCG64 from
    `seed`: deterministic) and refits each resample starting from the point estimate; or, given
    `resample` (a generator -> data like `point.data`, e.g. `noise.Replicates.resampler()`), refits
    its draws instead. Resamples that are degenerate (too few distinct x) or fail to fit are
    dropped and counted in `n_boot_failed`, with a warning (the intervals are unreliable when more
    than 5% failed).
    """
    if int(n_boot) != n_boot or n_boot < 2:
        raise ConfigError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    _percentile_interval(np.zeros((2, 1)), level)  # validates level before any work
    start = time.perf_counter()
    refit = _REFIT[point.law]
    n = point.n_points
    rng = np.random.default_rng(seed)
    rows = []
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        draws = (tuple(a[idx] for a in point.data)
                 for idx in rng.integers(0, n, size=(int(n_boot), n))) if resample is None \
            else (resample(rng) for _ in range(int(n_boot)))
        for data in draws:
            try:
                row = refit(data, point)
            except (ValueError, ArithmeticError, np.linalg.LinAlgError):  # ConfigError too
                row = None
            if row is not None and np.all(np.isfinite(row)):
                rows.append(row)
    samples = np.array(rows).reshape(-1, len(point.param_names))
    failed = int(n_boot) - len(samples)
    if len(samples) < 2:
        raise ConfigError(f"bootstrap of {point.form}: only {len(samples)} of {n_boot} "
                          "resamples could be fitted; the data are too few or too degenerate")
    lo, hi = _percentile_interval(samples, level)
    intervals = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(point.param_names)}
    warnings = list(point.warnings)
    if failed:
        warnings.append(f"{failed} of {n_boot} bootstrap resamples could not be fitted"
                        + (": the intervals are unreliable" if failed > 0.05 * n_boot else ""))
    info = {**point.info, "bootstrap_seconds": time.perf_counter() - start, "seed": seed}
    return dataclasses.replace(point, intervals=intervals, level=level, samples=samples,
                               n_boot_failed=failed, warnings=tuple(warnings), info=info)


def bootstrap(fit_fn: Callable[..., Fit], data: Sequence[Any], *, n_boot: int = DEFAULT_N_BOOT,
              seed: int = 0, level: float = 0.95, **fit_kwargs: Any) -> Fit:
    """Fit `fit_fn(*data, **fit_kwargs)` and add bootstrap intervals (see `bootstrap_fit`).

    `data` is (N, L) for the L(N) fitters or (N, D, L) for `fit_chinchilla`. The point estimate
    is the full fit (the whole grid for Chinchilla); the resamples are refitted fast from it.
    Points a fitter drops (`drop_highest_loss`) are dropped once, before resampling.
    """
    return bootstrap_fit(fit_fn(*data, **fit_kwargs), n_boot=n_boot, seed=seed, level=level)
