"""Scaling-law fits for the results table: L(N), L(N, D), isoflops, b1.58 vs bf16 comparisons.

numpy and scipy only (no JAX, no Flax): the fitter knows nothing of how the runs were trained.

Laws (N parameters, D tokens, L loss; every fit reports `form`, `params`, goodness of fit):
- `fit_power_law`:             L(N) = A N^-alpha, least squares of log L on log N.
- `fit_power_law_with_offset`: L(N) = E + A N^-alpha, least squares of the log-loss residuals.
- `fit_chinchilla`:            L(N, D) = E + A N^-alpha + B D^-beta, Epoch AI's replication of
  Chinchilla approach 3 (Besiroglu et al. 2024): Huber loss (delta 1e-3) of
  log L - LSE(a - alpha log N, b - beta log D, e), L-BFGS from a grid of 4500 starts.
- `fit_isoflop`:               Chinchilla approach 2, a parabola of L against log N per compute
  budget, then N*(C) = k C^a and D* = C / (6 N*).

`bootstrap` resamples points with replacement and refits every resample from the point estimate,
giving percentile intervals for every parameter (`Fit.intervals`) and for predictions
(`Fit.prediction_interval`). `loss_ratio` and `effective_parameter_multiplier` compare two recipes,
`loss_vs_resource` compares them against weight memory or energy, and `fit_table` / `format_fits`
fit a results table per recipe for `bitnet fit TABLE.csv`.

Errors for people (`ConfigError`): too few points, non-positive or non-finite values, degenerate x,
mismatched lengths. Fits that ran but look wrong (an exponent at a bound, a floor at zero, an
optimizer that did not converge) carry strings in `Fit.warnings` instead of failing silently.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import optimize, stats
from threadpoolctl import threadpool_limits

from bitnet_jax.errors import ConfigError

__all__ = [
    "Fit", "Grid", "EPOCH_GRID", "DEFAULT_N_BOOT", "fit_power_law", "fit_power_law_with_offset",
    "fit_chinchilla", "chinchilla_compute_optimal", "bootstrap", "bootstrap_fit",
    "IsoflopFit", "fit_isoflop", "Band", "loss_ratio", "loss_ratio_band",
    "effective_parameter_multiplier", "effective_parameter_multiplier_band",
    "fit_loss_vs_resource", "ResourceComparison", "loss_vs_resource",
    "RecipeFits", "read_table", "fit_table", "format_fits",
]

DEFAULT_N_BOOT = 1000  # Epoch used 4000; 1000 keeps a Chinchilla bootstrap to a few seconds
ALPHA_MAX = 5.0  # bound of the L(N) exponent: a loss falling faster than N^-5 is not a fit


# ----------------------------------------------------------------------------------------------
# One BLAS thread while scipy's small optimizers run.

@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the enclosed scipy optimizers with a single BLAS thread (threadpoolctl).

    Why: L-BFGS-B calls LAPACK on 5x5 matrices at every step. A multi-threaded OpenBLAS wakes its
    thread pool for each call, which made the 4500-start Epoch fit 14x slower on a 2-core machine
    (0.75 ms instead of 0.05 ms a step).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------------------------
# Laws: parameter names, formulas and evaluation (params may be arrays, for bootstrap samples).

def _eval_power_law(p: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    return np.exp(np.log(p["A"]) - p["alpha"] * np.log(x))


def _eval_power_law_offset(p: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    return p["E"] + _eval_power_law(p, x)


def _eval_chinchilla(p: Mapping[str, Any], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return (p["E"] + np.exp(np.log(p["A"]) - p["alpha"] * np.log(n))
            + np.exp(np.log(p["B"]) - p["beta"] * np.log(d)))


_LAWS: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "power_law": (("A", "alpha"), _eval_power_law),
    "power_law_offset": (("E", "A", "alpha"), _eval_power_law_offset),
    "chinchilla": (("E", "A", "B", "alpha", "beta"), _eval_chinchilla),
}


def _form(law: str, x_names: Sequence[str]) -> str:
    """Human formula of a law in the names of its variables."""
    if law == "power_law":
        return f"L({x_names[0]}) = A * {x_names[0]}^-alpha"
    if law == "power_law_offset":
        return f"L({x_names[0]}) = E + A * {x_names[0]}^-alpha"
    n, d = x_names
    return f"L({n}, {d}) = E + A * {n}^-alpha + B * {d}^-beta"


# ----------------------------------------------------------------------------------------------
# Results.

@dataclass(frozen=True, eq=False)
class Fit:
    """A fitted law with its goodness of fit and, after `bootstrap`, its intervals.

    `residuals` are observed minus predicted loss at the fitted points (`data`, in input order,
    after any dropped points); `r2` and `rmse` are in loss units. `objective` is the minimised
    value of the fitting objective. `samples` holds one row of parameters (in `param_names`
    order) per successful bootstrap refit; `intervals` are their percentile intervals at `level`.
    """

    law: str
    form: str
    x_names: tuple[str, ...]
    params: dict[str, float]
    r2: float
    rmse: float
    residuals: np.ndarray
    n_points: int
    objective: float
    data: tuple[np.ndarray, ...]  # the fitted points: (x, L) or (N, D, L)
    options: dict[str, Any] = field(default_factory=dict)  # what a refit needs (e.g. Huber delta)
    warnings: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)  # diagnostics: seconds, starts, ...
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: Optional[float] = None
    samples: Optional[np.ndarray] = None
    n_boot_failed: int = 0

    @property
    def param_names(self) -> tuple[str, ...]:
        return _LAWS[self.law][0]

    def _xs(self, x: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
        if len(x) == 1 and isinstance(x[0], tuple) and len(self.x_names) > 1:
            x = x[0]  # predict((N, D))
        if len(x) != len(self.x_names):
            raise ConfigError(f"{self.form} takes {len(self.x_names)} variable(s) "
                              f"({', '.join(self.x_names)}), got {len(x)}")
        return tuple(np.asarray(v, dtype=float) for v in x)

    def predict(self, *x: Any) -> np.ndarray:
        """Predicted loss: `predict(N)`, or `predict(N, D)` / `predict((N, D))` for L(N, D)."""
        return np.asarray(_LAWS[self.law][1](self.params, *self._xs(x)))

    def sample_params(self) -> dict[str, np.ndarray]:
        """Bootstrap parameter samples by name (arrays of length n_boot)."""
        if self.samples is None or len(self.samples) == 0:
            raise ConfigError(f"the fit {self.form} has no bootstrap samples: "
                              "pass it through bootstrap(...) or bootstrap_fit(...) first")
        return {name: self.samples[:, i] for i, name in enumerate(self.param_names)}

    def predict_samples(self, *x: Any) -> np.ndarray:
        """Predictions of every bootstrap fit, shape (n_boot, *x.shape)."""
        xs = self._xs(x)
        extra = (1,) * np.ndim(np.broadcast_arrays(*xs)[0])
        p = {k: v.reshape(-1, *extra) for k, v in self.sample_params().items()}
        return np.asarray(_LAWS[self.law][1](p, *xs))

    def prediction_interval(self, *x: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of the predicted loss over the bootstrap fits (a confidence band
        for the mean curve, not for a new run's loss)."""
        return _percentile_interval(self.predict_samples(*x), level)

    def summary(self) -> str:
        """Parameters, intervals, goodness of fit and warnings as printable lines."""
        lines = [f"{self.form}    ({self.n_points} points)"]
        width = max(len(k) for k in self.params)
        for name, value in self.params.items():
            line = f"  {name:<{width}} = {value:.5g}"
            if name in self.intervals:
                lo, hi = self.intervals[name]
                line += f"    {100 * (self.level or 0):.0f}% CI [{lo:.5g}, {hi:.5g}]"
            lines.append(line)
        lines.append(f"  R^2 = {self.r2:.4f}, RMSE = {self.rmse:.4g}")
        if self.samples is not None:
            lines.append(f"  bootstrap: {len(self.samples)} refits"
                         + (f", {self.n_boot_failed} failed" if self.n_boot_failed else ""))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _percentile_interval(samples: np.ndarray, level: float,
                         method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """Two-sided percentile interval along axis 0, NaNs ignored."""
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    lo, hi = np.nanquantile(samples, [tail, 1 - tail], axis=0, method=method)
    return lo, hi


def _goodness(observed: np.ndarray, predicted: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(R^2, RMSE, residuals) in loss units."""
    residuals = observed - predicted
    total = np.sum((observed - observed.mean()) ** 2)
    r2 = float(1 - np.sum(residuals ** 2) / total) if total > 0 else float("nan")
    return r2, float(np.sqrt(np.mean(residuals ** 2))), residuals


def _make_fit(law: str, x_names: Sequence[str], params: Mapping[str, float],
              data: tuple[np.ndarray, ...], objective: float, options: Mapping[str, Any],
              warnings: Sequence[str], info: Mapping[str, Any]) -> Fit:
    params = {k: float(params[k]) for k in _LAWS[law][0]}
    predicted = _LAWS[law][1](params, *data[:-1])
    r2, rmse, residuals = _goodness(data[-1], predicted)
    return Fit(law=law, form=_form(law, x_names), x_names=tuple(x_names), params=params, r2=r2,
               rmse=rmse, residuals=residuals, n_points=len(data[-1]), objective=float(objective),
               data=data, options=dict(options), warnings=tuple(warnings), info=dict(info))


# ----------------------------------------------------------------------------------------------
# Input checks.

def _positive(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    bad = ~np.isfinite(array) | (array <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{name} must be finite and positive (scaling laws work in logs): "
                          f"{name}[{i}] = {float(array[i])!r} ({int(bad.sum())} bad value(s))")
    return array


def _check_inputs(names: Sequence[str], arrays: Sequence[Any], n_params: int,
                  law: str, min_distinct: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    """Validate positive finite 1-D inputs of one length, enough points and spread in x."""
    checked = tuple(_positive(n, a) for n, a in zip(names, arrays))
    lengths = {n: len(a) for n, a in zip(names, checked)}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"mismatched lengths: {lengths}; every point needs one value of each")
    n = len(checked[0])
    if n < n_params + 1:
        raise ConfigError(f"{law} has {n_params} parameters: it needs at least {n_params + 1} "
                          f"points (parameters + 1), got {n}")
    for name, needed in min_distinct.items():
        values = checked[list(names).index(name)]
        distinct = len(np.unique(values))
        if distinct < needed:
            what = f"all {name} values are equal ({values[0]:g})" if distinct == 1 else \
                f"only {distinct} distinct {name} values"
            raise ConfigError(f"degenerate data for {law}: {what}; it needs at least {needed} "
                              f"distinct values of {name}")
    return checked


# ----------------------------------------------------------------------------------------------
# L(N) = A N^-alpha.

def _power_law_params(x: np.ndarray, loss: np.ndarray) -> dict[str, float]:
    # Closed-form log-log regression: scipy.stats.linregress rather than our own normal equations.
    reg = stats.linregress(np.log(x), np.log(loss))
    return {"A": float(np.exp(reg.intercept)), "alpha": float(-reg.slope)}


def fit_power_law(N: Any, L: Any, *, x_name: str = "N") -> Fit:
    """Fit the pure power law `L(N) = A N^-alpha`.

    Objective: ordinary least squares of `log L = log A - alpha log N` (closed form, so no starts).
    Warns when alpha <= 0 (loss not falling with N).
    """
    start = time.perf_counter()
    x, loss = _check_inputs((x_name, "L"), (N, L), 2, "L = A N^-alpha", {x_name: 2})
    params = _power_law_params(x, loss)
    log_resid = np.log(loss) - np.log(_eval_power_law(params, x))
    warnings = [] if params["alpha"] > 0 else \
        [f"alpha = {params['alpha']:.4g} <= 0: the loss does not fall with {x_name}"]
    return _make_fit("power_law", (x_name,), params, (x, loss), float(np.sum(log_resid ** 2)), {},
                     warnings, {"seconds": time.perf_counter() - start})


# ----------------------------------------------------------------------------------------------
# L(N) = E + A N^-alpha.
#
# Parametrisation theta = (E, c, alpha) with c = log A - alpha * x0, x0 = mean(log N): centring
# log N decorrelates c from alpha (A alone moves by orders of magnitude when alpha moves a little).
# Residuals are log L - log(E + exp(c - alpha (log N - x0))), so every point weighs by its
# relative error, as in the Chinchilla fit. Bounds: 0 <= E <= min L, 0 <= alpha <= ALPHA_MAX.

def _offset_residuals(theta: np.ndarray, xc: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    e, c, alpha = theta
    return log_l - np.log(e + np.exp(c - alpha * xc))


def _offset_jacobian(theta: np.ndarray, xc: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    e, c, alpha = theta
    term = np.exp(c - alpha * xc)
    pred = e + term
    return -np.stack([np.ones_like(xc), term, -term * xc], axis=1) / pred[:, None]


def _offset_solve(x: np.ndarray, loss: np.ndarray, starts: Sequence[tuple[float, float]],
                  robust: Optional[float]) -> tuple[dict[str, float], float, bool, np.ndarray]:
    """Best least-squares fit of E + A x^-alpha from (E, alpha) starts: params, cost, converged,
    theta."""
    log_x, log_l = np.log(x), np.log(loss)
    x0 = float(log_x.mean())
    xc = log_x - x0
    e_max = float(loss.min())
    lower, upper = np.array([0.0, -np.inf, 0.0]), np.array([e_max, np.inf, ALPHA_MAX])
    kwargs = dict(loss="huber", f_scale=robust) if robust else {}
    best = None
    for e0, alpha0 in starts:
        e0 = float(np.clip(e0, 0.0, e_max * (1 - 1e-6)))
        alpha0 = float(np.clip(alpha0, 0.0, ALPHA_MAX))
        gap = np.maximum(loss - e0, 1e-12 * loss)
        c0 = float(np.mean(np.log(gap) + alpha0 * xc))  # least squares of c given (E, alpha)
        theta0 = np.clip([e0, c0, alpha0], lower, upper)
        # scipy's bounded trust-region least squares ('trf') rather than our own Gauss-Newton.
        res = optimize.least_squares(_offset_residuals, theta0, jac=_offset_jacobian,
                                     bounds=(lower, upper), args=(xc, log_l), method="trf",
                                     x_scale="jac", **kwargs)
        if np.all(np.isfinite(res.x)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise ConfigError("L = E + A N^-alpha: no start gave a finite fit")
    e, c, alpha = (float(v) for v in best.x)
    params = {"E": e, "A": float(np.exp(c + alpha * x0)), "alpha": alpha}
    return params, float(best.cost), bool(best.success), best.x


def _offset_warnings(params: Mapping[str, float], loss: np.ndarray, x_name: str) -> list[str]:
    warnings = []
    e_max = float(loss.min())
    if params["E"] <= 1e-9 * e_max:
        warnings.append(f"E is at its lower bound 0: the data show no loss floor; "
                        f"the pure power law L = A {x_name}^-alpha may describe them better")
    if params["E"] >= e_max * (1 - 1e-6):
        warnings.append(f"E = {params['E']:.4g} reached the lowest observed loss (its upper bound)")
    if params["alpha"] <= 1e-9:
        warnings.append(f"alpha is at its lower bound 0: the loss does not fall with {x_name}")
    if params["alpha"] >= ALPHA_MAX * (1 - 1e-6):
        warnings.append(f"alpha is at its upper bound {ALPHA_MAX}")
    return warnings


def fit_power_law_with_offset(N: Any, L: Any, *, robust: Optional[float] = None,
                              x_name: str = "N") -> Fit:
    """Fit `L(N) = E + A N^-alpha` (Kaplan form with an irreducible loss E).

    Objective: sum of squared log-loss residuals `log L - log(E + A N^-alpha)` (the Huber loss of
    them with delta `robust` when given), minimised by scipy's bounded least squares from 16 starts
    (E in {0, .5, .8, .95} x min L, alpha in {.1, .3, .6, 1}) in the centred parametrisation
    above; the best is kept. E is bounded to [0, min L] and alpha to [0, ALPHA_MAX]: a fit at a
    bound carries a warning.
    """
    start = time.perf_counter()
    x, loss = _check_inputs((x_name, "L"), (N, L), 3, "L = E + A N^-alpha", {x_name: 3})
    e_max = float(loss.min())
    starts = list(itertools.product([0.0, 0.5 * e_max, 0.8 * e_max, 0.95 * e_max],
                                    [0.1, 0.3, 0.6, 1.0]))
    with _one_blas_thread():
        params, cost, converged, _ = _offset_solve(x, loss, starts, robust)
    warnings = _offset_warnings(params, loss, x_name)
    if not converged:
        warnings.append("the least-squares solver did not report convergence")
    return _make_fit("power_law_offset", (x_name,), params, (x, loss), 2 * cost,
                     {"robust": robust}, warnings,
                     {"seconds": time.perf_counter() - start, "n_starts": len(starts)})


# ----------------------------------------------------------------------------------------------
# L(N, D) = E + A N^-alpha + B D^-beta, Epoch AI's method.

@dataclass(frozen=True)
class Grid:
    """Initialisations of the Chinchilla fit: every combination is one L-BFGS start."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    e: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]

    def points(self) -> np.ndarray:
        """Starts as rows of theta = (a, b, e, alpha, beta)."""
        return np.array(list(itertools.product(self.a, self.b, self.e, self.alpha, self.beta)),
                        dtype=float)

    def __len__(self) -> int:
        return len(self.alpha) * len(self.beta) * len(self.e) * len(self.a) * len(self.b)


# Epoch AI's grid (Hoffmann et al.'s, as they reconstructed it): 5 * 5 * 5 * 6 * 6 = 4500 starts.
EPOCH_GRID = Grid(alpha=(0.0, 0.5, 1.0, 1.5, 2.0), beta=(0.0, 0.5, 1.0, 1.5, 2.0),
                  e=(-1.0, -0.5, 0.0, 0.5, 1.0), a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                  b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0))


def _chinchilla_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray,
                          log_l: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(delta) of r = log L - LSE(a - alpha log N, b - beta log D, e), and its
    gradient in theta = (a, b, e, alpha, beta), vectorised over points.

    Analytic gradient: d LSE / d(term k) is the softmax weight w_k, and d Huber / d r is
    clip(r, -delta, delta), so each step costs a handful of array operations instead of the
    6 extra evaluations of finite differences.
    """
    a, b, e, alpha, beta = theta
    t_n = a - alpha * log_n
    t_d = b - beta * log_d
    top = np.maximum(np.maximum(t_n, t_d), e)  # log-sum-exp shift: no overflow at any start
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    resid = log_l - top - np.log(total)
    psi = np.clip(resid, -delta, delta)
    value = float(psi @ (resid - 0.5 * psi))  # = sum of Huber: r^2/2 inside delta, linear out
    g = psi / total
    g_n, g_d = g * w_n, g * w_d
    grad = np.array([-g_n.sum(), -g_d.sum(), -(g @ w_e), g_n @ log_n, g_d @ log_d])
    return value, grad


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    with np.errstate(over="ignore"):  # a runaway start gives inf, flagged by the warnings
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
                "alpha": alpha, "beta": beta}


def _params_to_theta(p: Mapping[str, float]) -> np.ndarray:
    return np.array([math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"]])


# Tight L-BFGS-B tolerances for refits and the final polish. Why: L-BFGS-B stops when the
# reduction of f over max(|f|, 1) falls below ftol (default 2.2e-9); the summed Huber loss is
# ~1e-3, so by default it stops on a relative change of ~2e-6 of f, which in the flat valley of
# (a, alpha) happens after a few steps when starting next to the optimum: bootstrap refits barely
# moved from the point estimate (A within 0.1 of 477.8) and the intervals came out ~100x too
# narrow. With these, refits reach the optimum Nelder-Mead finds to 7 digits.
_TIGHT = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000}


def _lbfgs(theta0: np.ndarray, args: tuple, tight: bool = False) -> optimize.OptimizeResult:
    # scipy's L-BFGS-B (unbounded parameters, as in Epoch's replication) rather than our own.
    return optimize.minimize(_chinchilla_objective, theta0, args=args, jac=True,
                             method="L-BFGS-B", options=_TIGHT if tight else None)


def _chinchilla_warnings(params: Mapping[str, float], loss: np.ndarray, grid: Grid,
                         converged: bool) -> list[str]:
    warnings = []
    for name in ("alpha", "beta"):
        top = max(getattr(grid, name))
        if params[name] <= 0:
            warnings.append(f"{name} = {params[name]:.4g} <= 0: that term does not fall")
        elif params[name] > top:
            warnings.append(f"{name} = {params[name]:.4g} is beyond the grid's largest start {top}")
    for name in ("A", "B"):
        if params[name] > 1e12:
            warnings.append(f"{name} = {params[name]:.3g} is huge: that term is poorly determined")
    if params["E"] >= loss.min():
        warnings.append(f"E = {params['E']:.4g} is not below the lowest observed loss "
                        f"{loss.min():.4g}")
    if not converged:
        warnings.append("no L-BFGS start reported convergence; the best one is returned")
    return warnings


def fit_chinchilla(N: Any, D: Any, L: Any, *, huber_delta: float = 1e-3,
                   drop_highest_loss: int = 0, grid: Grid = EPOCH_GRID,
                   x_names: tuple[str, str] = ("N", "D")) -> Fit:
    """Fit `L(N, D) = E + A N^-alpha + B D^-beta` by Epoch AI's method (Besiroglu et al. 2024).

    Objective: sum over points of Huber_delta(log L - LSE(a - alpha log N, b - beta log D, e)),
    with A = e^a, B = e^b, E = e^e, delta = `huber_delta`. Minimised by scipy's L-BFGS-B (analytic
    gradient) from every start of `grid` (Epoch's: alpha, beta in {0, .5, .., 2}, e in
    {-1, -.5, .., 1}, a, b in {0, 5, .., 25}); the lowest objective among converged starts wins.
    `drop_highest_loss` removes that many highest-loss points first (Epoch drop 5 of 245).
    Deterministic; `info` has the time, the number of starts and how many reached the optimum.
    """
    start = time.perf_counter()
    if int(drop_highest_loss) != drop_highest_loss or drop_highest_loss < 0:
        raise ConfigError(f"drop_highest_loss must be a non-negative integer, "
                          f"got {drop_highest_loss!r}")
    if not huber_delta > 0:
        raise ConfigError(f"huber_delta must be positive, got {huber_delta!r}")
    law = "L = E + A N^-alpha + B D^-beta"
    n, d, loss = (_positive(name, v) for name, v in zip((*x_names, "L"), (N, D, L)))
    if drop_highest_loss:
        if drop_highest_loss >= len(loss):
            raise ConfigError(f"drop_highest_loss={drop_highest_loss} leaves no points of "
                              f"{len(loss)}")
        keep = np.sort(np.argsort(loss, kind="stable")[: len(loss) - drop_highest_loss])
        n, d, loss = n[keep], d[keep], loss[keep]
    # >= 3 distinct values of each: with 2 values of D, E + B D^-beta is known at 2 points only
    # and (E, B, beta) slide along a flat valley (the bootstrap then stays at its start).
    n, d, loss = _check_inputs((*x_names, "L"), (n, d, loss), 5, law,
                               {x_names[0]: 3, x_names[1]: 3})
    args = (np.log(n), np.log(d), np.log(loss), float(huber_delta))
    starts = grid.points()
    values = np.full(len(starts), np.inf)
    thetas = np.full_like(starts, np.nan)
    succeeded = np.zeros(len(starts), dtype=bool)
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
        for i, theta0 in enumerate(starts):
            res = _lbfgs(theta0, args)
            if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
                values[i], thetas[i], succeeded[i] = res.fun, res.x, res.success
    if not np.isfinite(values).any():
        raise ConfigError(f"{law}: no L-BFGS start gave a finite fit")
    pool = succeeded if succeeded.any() else np.isfinite(values)
    best = int(np.flatnonzero(pool)[np.argmin(values[pool])])
    # The grid runs with scipy's default tolerances, as Epoch's did; the winner is then polished
    # with tight ones so that the estimate is a true optimum (on Epoch's data it moves < 1e-6).
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
        polished = _lbfgs(thetas[best], args, tight=True)
    best_value, best_theta = values[best], thetas[best]
    if np.isfinite(polished.fun) and polished.fun <= best_value:
        best_value, best_theta = float(polished.fun), polished.x
    params = _theta_to_params(best_theta)
    warnings = _chinchilla_warnings(params, loss, grid, bool(succeeded.any()))
    at_best = int(np.sum(values <= values[best] * (1 + 1e-6) + 1e-15))
    info = {"seconds": time.perf_counter() - start, "n_starts": len(starts),
            "n_converged": int(succeeded.sum()), "n_at_optimum": at_best,
            "n_dropped": int(drop_highest_loss)}
    return _make_fit("chinchilla", x_names, params, (n, d, loss), best_value,
                     {"huber_delta": float(huber_delta)}, warnings, info)


def chinchilla_compute_optimal(fit: Fit, C: Any) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N*, D*) of a Chinchilla fit under C = 6 N D (Hoffmann et al. eq. 4):
    N* = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D* = C/(6 N*)."""
    if fit.law != "chinchilla":
        raise ConfigError(f"chinchilla_compute_optimal needs an L(N, D) fit, got {fit.form}")
    p = fit.params
    s = p["alpha"] + p["beta"]
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    c6 = np.asarray(C, dtype=float) / 6
    n_opt = g * c6 ** (p["beta"] / s)
    return n_opt, c6 / n_opt


# ----------------------------------------------------------------------------------------------
# Bootstrap.
#
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
                  level: float = 0.95) -> Fit:
    """`point` with bootstrap samples and percentile intervals for every parameter.

    Resamples the fitted points (`point.data`) with replacement `n_boot` times (numpy's PCG64 from
    `seed`: deterministic) and refits each resample starting from the point estimate. Resamples
    that are degenerate (too few distinct x) or fail to fit are dropped and counted in
    `n_boot_failed`; more than 5% failures adds a warning.
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
        for idx in rng.integers(0, n, size=(int(n_boot), n)):
            try:
                row = refit(tuple(a[idx] for a in point.data), point)
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
    if failed > 0.05 * n_boot:
        warnings.append(f"{failed} of {n_boot} bootstrap resamples could not be fitted: "
                        "the intervals are unreliable")
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


# ----------------------------------------------------------------------------------------------
# Isoflop (Chinchilla approach 2).

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
        lines = [f"{self.form}    ({len(self.budgets)} budgets)"]
        for name, value in self.params.items():
            line = f"  {name} = {value:.5g}"
            if name in self.intervals:
                lo, hi = self.intervals[name]
                line += f"    {100 * (self.level or 0):.0f}% CI [{lo:.5g}, {hi:.5g}]"
            lines.append(line)
        for c, n_opt, l_opt, m in zip(self.budgets, self.n_opt, self.loss_opt, self.n_points):
            lines.append(f"  C = {c:.3g}: N* = {n_opt:.4g}, D* = {c / (6 * n_opt):.4g}, "
                         f"L* = {l_opt:.4f} ({m} runs)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

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


# ----------------------------------------------------------------------------------------------
# Comparisons between recipes.

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
    """Bootstrap parameter samples of both fits, paired by index (they are independent draws)."""
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


# ----------------------------------------------------------------------------------------------
# Results tables.

PARAM_COLUMNS = ("params_non_embedding", "params", "n_params", "N")
TOKEN_COLUMNS = ("tokens", "train_tokens", "D")
LOSS_COLUMNS = ("final_eval_loss", "eval_loss", "loss")
RECIPE_COLUMNS = ("recipe", "precision")  # the sweep's results table calls it "precision"
STATUS_COLUMN, COMPLETED = "status", "completed"  # rows of runs that did not finish are skipped


@dataclass(frozen=True, eq=False)
class RecipeFits:
    """The fits of one recipe's runs: L(N) with offset, the pure power law, and L(N, D) when the
    table varies both N and D. `notes` say what was not fitted and why."""

    recipe: str
    n_points: int
    columns: dict[str, str]
    offset: Optional[Fit]
    power: Optional[Fit]
    chinchilla: Optional[Fit]
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> dict[str, Fit]:
        return {k: v for k, v in (("offset", self.offset), ("power", self.power),
                                  ("chinchilla", self.chinchilla)) if v is not None}


def read_table(path: Union[str, Path]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header line (the csv module: no pandas needed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results table {str(path)!r} not found")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"results table {str(path)!r} has no rows")
    return rows


def _pick_column(columns: Sequence[str], given: Optional[str], defaults: Sequence[str],
                 what: str, required: bool) -> Optional[str]:
    if given is not None:
        if given not in columns:
            raise ConfigError(f"{what} column {given!r} is not in the table (columns: "
                              f"{list(columns)})")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise ConfigError(f"no {what} column in the table: name one of {list(defaults)} or pass "
                          f"it explicitly (columns: {list(columns)})")
    return found


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fit_or_note(notes: list[str], what: str, fn: Callable[[], Fit]) -> Optional[Fit]:
    try:
        return fn()
    except ConfigError as error:
        notes.append(f"{what} not fitted: {error}")
        return None


def fit_table(table: Union[str, Path, Sequence[Mapping[str, Any]]], *,
              params_column: Optional[str] = None, tokens_column: Optional[str] = None,
              loss_column: Optional[str] = None, recipe_column: Optional[str] = None,
              n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95,
              chinchilla: bool = True, huber_delta: float = 1e-3,
              grid: Grid = EPOCH_GRID) -> dict[str, RecipeFits]:
    """Fit a results table per recipe (what `bitnet fit TABLE.csv` prints).

    `table` is a CSV path or a list of row dicts. Columns default to the first present of
    PARAM_COLUMNS (N), TOKEN_COLUMNS (D, optional) and LOSS_COLUMNS (L); rows are grouped by
    `recipe_column` (default: the first of RECIPE_COLUMNS present; else one group, "all"). Rows
    whose `status` column is present and not "completed", or with a missing or non-positive
    value, are skipped (noted). Per recipe: L(N) = E + A N^-alpha and L(N) = A N^-alpha
    and, when D varies (>= 3 distinct N and D, >= 6 points) and `chinchilla`, Epoch's L(N, D);
    each with `n_boot` bootstrap refits (0: none). A fit that cannot be made becomes a note.
    """
    rows = read_table(table) if isinstance(table, (str, Path)) else [dict(r) for r in table]
    if not rows:
        raise ConfigError("the results table has no rows")
    columns = list(rows[0].keys())
    n_col = _pick_column(columns, params_column, PARAM_COLUMNS, "parameters", True)
    d_col = _pick_column(columns, tokens_column, TOKEN_COLUMNS, "tokens", False)
    l_col = _pick_column(columns, loss_column, LOSS_COLUMNS, "loss", True)
    r_col = _pick_column(columns, recipe_column, RECIPE_COLUMNS, "recipe", False)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    unfinished: dict[str, dict[str, int]] = {}
    for row in rows:
        recipe = str(row[r_col]) if r_col else "all"
        status = str(row.get(STATUS_COLUMN, COMPLETED) or "")
        if status != COMPLETED:
            counts = unfinished.setdefault(recipe, {})
            counts[status or "(empty)"] = counts.get(status or "(empty)", 0) + 1
            continue
        groups.setdefault(recipe, []).append(row)
    for recipe in unfinished:
        groups.setdefault(recipe, [])
    used = {"N": n_col, "L": l_col, **({"D": d_col} if d_col else {}),
            **({"recipe": r_col} if r_col else {})}
    results = {}
    for recipe, members in groups.items():
        notes: list[str] = []
        if recipe in unfinished:
            notes.append("skipped unfinished runs: " + ", ".join(
                f"{k} {status}" for status, k in sorted(unfinished[recipe].items())))
        names = [n_col, l_col] + ([d_col] if d_col else [])
        values = np.array([[_number(r.get(c)) for c in names] for r in members])
        values = values.reshape(-1, len(names))  # (0, k) when every run was skipped
        ok = np.all(np.isfinite(values) & (values > 0), axis=1)
        if not ok.all():
            notes.append(f"{int((~ok).sum())} row(s) skipped: missing, non-numeric or "
                         f"non-positive {', '.join(names)}")
        values = values[ok]
        n, loss = values[:, 0], values[:, 1]
        tokens = values[:, 2] if d_col else None

        def boot(fit: Fit) -> Fit:
            return bootstrap_fit(fit, n_boot=n_boot, seed=seed, level=level) if n_boot else fit

        if tokens is not None and len(np.unique(tokens)) > 1:
            notes.append(f"{len(np.unique(tokens))} distinct token counts: the L(N) fits mix "
                         "data sizes")
        offset = _fit_or_note(notes, "L(N) = E + A N^-alpha",
                              lambda: boot(fit_power_law_with_offset(n, loss)))
        power = _fit_or_note(notes, "L(N) = A N^-alpha", lambda: boot(fit_power_law(n, loss)))
        chin = None
        if chinchilla and tokens is not None:
            if len(np.unique(tokens)) < 3:
                notes.append(f"L(N, D) not fitted: {len(np.unique(tokens))} distinct token "
                             "count(s); E, B and beta need at least 3")
            else:
                chin = _fit_or_note(notes, "L(N, D)", lambda: boot(fit_chinchilla(
                    n, tokens, loss, huber_delta=huber_delta, grid=grid)))
        results[recipe] = RecipeFits(recipe, len(loss), used, offset, power, chin, tuple(notes))
    return results


def format_fits(fits: Mapping[str, RecipeFits], *, reference: str = "bf16") -> str:
    """Printable summary of `fit_table`'s result; when `reference` is among the recipes, each
    other recipe's L(N) is compared with it (loss ratio and effective parameter multiplier at the
    smallest and largest N of the runs)."""
    blocks = []
    for recipe, group in fits.items():
        lines = [f"== {recipe}: {group.n_points} runs ("
                 + ", ".join(f"{k} = {v}" for k, v in group.columns.items()) + ")"]
        lines += [fit.summary() for fit in group.fits.values()]
        lines += [f"note: {note}" for note in group.notes]
        blocks.append("\n".join(lines))
    ref = fits.get(reference)
    if ref is not None and ref.offset is not None:
        for recipe, group in fits.items():
            if recipe == reference or group.offset is None:
                continue
            n = np.array([group.offset.data[0].min(), group.offset.data[0].max()])
            ratio = loss_ratio(group.offset, ref.offset, n)
            mult = effective_parameter_multiplier(group.offset, ref.offset, n)
            blocks.append(f"== {recipe} vs {reference} (L(N) with offset)\n" + "\n".join(
                f"  N = {x:.4g}: loss ratio {r:.4f}, matches {reference} of "
                f"{m * x:.4g} parameters (x{m:.3g})" for x, r, m in zip(n, ratio, mult)))
    return "\n\n".join(blocks)
