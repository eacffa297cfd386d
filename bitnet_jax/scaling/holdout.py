"""Validation by extrapolation: fit a law without the largest sizes and predict them.

A law is judged by what it predicts. `split_largest` holds out the K largest sizes (by N, or by
compute N x D where the token count varies); the law is fitted and bootstrapped on the rest, and
`predict_held_out` gives each held-out size its predicted loss and a 95% band for the loss a run
there would show: the bootstrap of the law fitted on the rest plus the noise of one observation
(the seed spread of a mean of its seeds where sizes have replicates, else the fit's residual
spread). A law that describes the data puts about 95% of held-out runs inside their bands; a
wrong law misses them. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from bitnet_jax.scaling.laws import Fit, _percentile_interval
from bitnet_jax.scaling.noise import Replicates

__all__ = ["DEFAULT_HOLDOUT", "HeldOut", "split_largest", "predict_held_out"]

DEFAULT_HOLDOUT = 1  # sizes held out by `bitnet fit` and every sweep report (where enough remain)


@dataclass(frozen=True)
class HeldOut:
    """One held-out size: its observed (mean) loss, the prediction of the law fitted without it,
    and that prediction's band (None without a bootstrap)."""

    N: float
    D: Optional[float]
    observed: float
    predicted: float
    low: Optional[float]
    high: Optional[float]

    @property
    def rel_error(self) -> float:
        """(predicted - observed) / observed."""
        return (self.predicted - self.observed) / self.observed

    @property
    def inside(self) -> Optional[bool]:
        if self.low is None:
            return None
        slack = 1e-9 * abs(self.observed)  # an exact prediction of noise-free data has no band
        return bool(self.low - slack <= self.observed <= self.high + slack)

    def to_json(self) -> dict[str, Any]:
        return {"N": self.N, "D": self.D, "observed": self.observed, "predicted": self.predicted,
                "low": self.low, "high": self.high, "rel_error": self.rel_error}


def split_largest(replicates: Replicates, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the sizes kept and of the `k` largest (by N, or by N x D where D varies)."""
    n = replicates.x[0]
    size = n * replicates.x[1] if len(replicates.x) > 1 and np.ptp(replicates.x[1]) > 0 else n
    order = np.argsort(size, kind="stable")
    return np.sort(order[: len(order) - k]), np.sort(order[len(order) - k:])


def _observation_noise(fit: Fit, rest: Replicates, held: Replicates) -> np.ndarray:
    """Standard deviation of log loss of each held-out observation (a mean of its seeds)."""
    if rest.has_replicates:
        return rest.log_sd / np.sqrt(held.counts)
    dof = fit.n_points - len(fit.params)
    if dof <= 0:
        return np.zeros(len(held))
    log_resid = np.log(fit.data[-1]) - np.log(fit.predict(*fit.data[:-1]))
    return np.full(len(held), np.sqrt(np.sum(log_resid ** 2) / dof))


def predict_held_out(fit: Fit, rest: Replicates, held: Replicates, *, level: float = 0.95,
                     seed: int = 0) -> tuple[HeldOut, ...]:
    """Predictions of the held-out sizes by `fit` (fitted on `rest`), with bands when `fit` has
    bootstrap samples: percentiles of sample prediction x exp(noise of one observation)."""
    xs = held.x[: len(fit.x_names)]
    predicted = fit.predict(*xs)
    low = high = [None] * len(held)
    if fit.samples is not None:
        samples = fit.predict_samples(*xs)  # (n_boot, held)
        noise = _observation_noise(fit, rest, held)
        rng = np.random.default_rng(seed)
        draws = samples * np.exp(noise * rng.standard_normal(samples.shape))
        low, high = (list(map(float, v)) for v in _percentile_interval(draws, level))
    d = held.x[1] if len(held.x) > 1 else [None] * len(held)
    return tuple(HeldOut(float(held.x[0][i]), None if d[i] is None else float(d[i]),
                         float(held.means[i]), float(predicted[i]), low[i], high[i])
                 for i in range(len(held)))
