"""Seed noise: replicate runs per size, their spread, and what it does to fits and comparisons.

A law is fitted to the mean loss of each size (one (N, D) point). Where sizes have several seeds,
the seed-to-seed spread is measured (the pooled standard deviation of log loss: noise in loss is
close to proportional to the loss) and used three ways: the bootstrap draws each size's mean from
that spread (`Replicates.resampler`, so the fit's intervals carry the measured noise), a held-out
prediction's band adds the noise of one observation, and a recipe's gap to the reference is
compared with the noise of the difference (`gap_against_noise`). numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["Replicates", "Gap", "gap_against_noise"]


@dataclass(frozen=True, eq=False)
class Replicates:
    """Losses per size: `x[i]` holds N (and D) of each size, `losses[i]` its replicates' losses.
    Sizes are sorted by N, then D."""

    x: tuple[np.ndarray, ...]
    losses: tuple[np.ndarray, ...]

    @classmethod
    def from_points(cls, x: Sequence[np.ndarray], loss: np.ndarray) -> "Replicates":
        """Group points by their x (every point with the same N and D is a replicate)."""
        keys = np.stack([np.asarray(v, dtype=float) for v in x], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        losses = tuple(np.asarray(loss, dtype=float)[inverse == i] for i in range(len(unique)))
        return cls(tuple(unique[:, j] for j in range(keys.shape[1])), losses)

    def __len__(self) -> int:
        return len(self.losses)

    @property
    def means(self) -> np.ndarray:
        return np.array([v.mean() for v in self.losses])

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(v) for v in self.losses])

    @property
    def spread(self) -> np.ndarray:
        """Seed-to-seed standard deviation of the loss per size (NaN with one seed)."""
        return np.array([v.std(ddof=1) if len(v) > 1 else np.nan for v in self.losses])

    @property
    def has_replicates(self) -> bool:
        return bool(np.any(self.counts > 1))

    @property
    def log_sd(self) -> float:
        """Pooled within-size standard deviation of log loss (NaN without replicates)."""
        dof = int(np.sum(self.counts - 1))
        if dof == 0:
            return float("nan")
        squares = sum(float(np.sum((np.log(v) - np.log(v).mean()) ** 2)) for v in self.losses)
        return float(np.sqrt(squares / dof))

    def subset(self, index: Sequence[int]) -> "Replicates":
        index = np.asarray(index, dtype=int)
        return Replicates(tuple(v[index] for v in self.x), tuple(self.losses[i] for i in index))

    def resampler(self, n_x: Optional[int] = None
                  ) -> Callable[[np.random.Generator], tuple[np.ndarray, ...]]:
        """Draws of (x[:n_x]..., mean loss per size): each size's mean moves by the measured noise
        of a mean of its seeds, log L_i + N(0, s^2 / k_i), s the pooled spread. Why parametric:
        two or three seeds resampled with replacement understate the spread (by (k - 1) / k) and
        give sizes with one seed none; the pooled s is estimated from every size's seeds at once."""
        log_means, scale = np.log(self.means), self.log_sd / np.sqrt(self.counts)
        x = self.x[:n_x]

        def draw(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
            return (*x, np.exp(log_means + scale * rng.standard_normal(len(scale))))

        return draw


@dataclass(frozen=True)
class Gap:
    """A recipe's mean loss minus the reference's at one size, with the 95% interval of the
    difference from the seeds (Welch); `exceeds` whether that interval excludes 0. None where a
    side has fewer than two seeds (the noise is not measured there)."""

    N: float
    D: Optional[float]
    gap: float
    low: Optional[float]
    high: Optional[float]
    seeds: tuple[int, int]

    @property
    def exceeds(self) -> Optional[bool]:
        return None if self.low is None else bool(self.low > 0 or self.high < 0)


def gap_against_noise(recipe: Replicates, reference: Replicates, level: float = 0.95) -> list[Gap]:
    """The gap at every size both recipes ran (same N and D), with its seed-noise interval."""
    ref = {tuple(float(v[i]) for v in reference.x): reference.losses[i]
           for i in range(len(reference))}
    gaps = []
    for i in range(len(recipe)):
        key = tuple(float(v[i]) for v in recipe.x)
        if key not in ref:
            continue
        a, b = recipe.losses[i], ref[key]
        gap = float(a.mean() - b.mean())
        low = high = None
        if len(a) > 1 and len(b) > 1:
            va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
            se = float(np.sqrt(va + vb))
            dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) \
                if se > 0 else 1.0
            half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
            low, high = gap - half, gap + half
        gaps.append(Gap(key[0], key[1] if len(key) > 1 else None, gap, low, high,
                        (len(a), len(b))))
    return gaps
