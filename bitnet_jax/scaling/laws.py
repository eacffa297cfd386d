"""Scaling laws and their fitters: L(N), L(N) with a floor, and L(N, D).

numpy and scipy only (no JAX, no Flax): the fitter knows nothing of how the runs were trained.

Laws (N parameters, D tokens, L loss; every fit reports `form`, `params`, goodness of fit):
- `fit_power_law`:             L(N) = A N^-alpha, least squares of log L on log N.
- `fit_power_law_with_offset`: L(N) = E + A N^-alpha, least squares of the log-loss residuals.
- `fit_chinchilla`:            L(N, D) = E + A N^-alpha + B D^-beta, Epoch AI's replication of
  Chinchilla approach 3 (Besiroglu et al. 2024): Huber loss (delta 1e-3) of
  log L - LSE(a - alpha log N, b - beta log D, e), L-BFGS from a grid of 4500 starts.

The rest of the scaling package builds on these: `bootstrap` (intervals for every parameter and
prediction), `isoflop` (Chinchilla approach 2), `compare` (recipes against a reference), `results`
(the results table) and `fit` (a results table fitted per recipe: `bitnet fit` and the reports).

Errors for people (`ConfigError`): too few points, non-positive or non-finite values, degenerate x,
mismatched lengths. Fits that ran but look wrong (an exponent at a bound, a floor at zero, an
optimizer that did not converge) carry strings in `Fit.warnings` instead of failing silently.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize, stats
from threadpoolctl import threadpool_limits

from bitnet_jax.errors import ConfigError

__all__ = [
    "Fit", "Grid", "EPOCH_GRID", "fit_power_law", "fit_power_law_with_offset",
    "fit_chinchilla", "chinchilla_compute_optimal", "summary_lines",
]

ALPHA_MAX = 5.0  # bound of the L(N) exponent: a loss falling faster than N^-5 is not a fit
AT_BOUND = "at_bound"  # Fit.info key: the parameters a fitter left at a bound (`trust` reads it)


# ----------------------------------------------------------------------------------------------
# One BLAS thread while scipy's small optimizers run.

_blas_limit = threading.local()  # how deep this thread is in `_one_blas_thread`


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the enclosed scipy optimizers with a single BLAS thread (threadpoolctl).

    Why: L-BFGS-B calls LAPACK on 5x5 matrices at every step. A multi-threaded OpenBLAS wakes its
    thread pool for each call, which made the 4500-start Epoch fit 14x slower on a 2-core machine
    (0.75 ms instead of 0.05 ms a step). A nested use keeps the outer limit rather than enter
    threadpoolctl again, whose every entry scans the process's loaded libraries: about 1 ms with
    JAX and torch loaded, as long as a bootstrap refit takes. The BLAS limit is the process's:
    like threadpoolctl itself, this is not for fits running in several threads at once.
    """
    depth = getattr(_blas_limit, "depth", 0)
    _blas_limit.depth = depth + 1
    try:
        if depth:
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        _blas_limit.depth = depth


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
        details = [f"  R^2 = {self.r2:.4f}, RMSE = {self.rmse:.4g}"]
        if self.samples is not None:
            details.append(f"  bootstrap: {len(self.samples)} refits"
                           + (f", {self.n_boot_failed} failed" if self.n_boot_failed else ""))
        return summary_lines(f"{self.form}    ({self.n_points} points)", self.params,
                             self.intervals, self.level, details, self.warnings)

    def __str__(self) -> str:
        return self.summary()


def summary_lines(head: str, params: Mapping[str, float],
                  intervals: Mapping[str, tuple[float, float]], level: Optional[float],
                  details: Sequence[str], warnings: Sequence[str]) -> str:
    """The printable summary of a fit (`Fit`, `IsoflopFit`): a head line, one line per parameter
    with its interval, the fit's own detail lines, then its warnings."""
    lines = [head]
    width = max(len(k) for k in params)
    for name, value in params.items():
        line = f"  {name:<{width}} = {value:.5g}"
        if name in intervals:
            lo, hi = intervals[name]
            line += f"    {100 * (level or 0):.0f}% CI [{lo:.5g}, {hi:.5g}]"
        lines.append(line)
    lines += details
    lines += [f"  warning: {w}" for w in warnings]
    return "\n".join(lines)


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
    bounds = [] if params["alpha"] > 0 else \
        [("alpha", f"alpha = {params['alpha']:.4g} <= 0: the loss does not fall with {x_name}")]
    return _make_fit("power_law", (x_name,), params, (x, loss), float(np.sum(log_resid ** 2)), {},
                     [w for _, w in bounds], {"seconds": time.perf_counter() - start,
                                              AT_BOUND: [name for name, _ in bounds]})


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


def _offset_bounds(params: Mapping[str, float], loss: np.ndarray,
                   x_name: str) -> list[tuple[str, str]]:
    """(parameter, warning) for each parameter of E + A x^-alpha at one of its bounds."""
    bounds = []
    e_max = float(loss.min())
    if params["E"] <= 1e-9 * e_max:
        bounds.append(("E", f"E is at its lower bound 0: the data show no loss floor; "
                            f"the pure power law L = A {x_name}^-alpha may describe them better"))
    if params["E"] >= e_max * (1 - 1e-6):
        bounds.append(("E", f"E = {params['E']:.4g} reached the lowest observed loss "
                            "(its upper bound)"))
    if params["alpha"] <= 1e-9:
        bounds.append(("alpha", f"alpha is at its lower bound 0: the loss does not fall with "
                                f"{x_name}"))
    if params["alpha"] >= ALPHA_MAX * (1 - 1e-6):
        bounds.append(("alpha", f"alpha is at its upper bound {ALPHA_MAX}"))
    return bounds


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
    bounds = _offset_bounds(params, loss, x_name)
    warnings = [w for _, w in bounds]
    if not converged:
        warnings.append("the least-squares solver did not report convergence")
    return _make_fit("power_law_offset", (x_name,), params, (x, loss), 2 * cost,
                     {"robust": robust}, warnings,
                     {"seconds": time.perf_counter() - start, "n_starts": len(starts),
                      AT_BOUND: [name for name, _ in bounds]})


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
                         converged: bool) -> list[tuple[Optional[str], str]]:
    """(parameter at the edge of what the law allows, or None; warning) pairs."""
    warnings: list[tuple[Optional[str], str]] = []
    for name in ("alpha", "beta"):
        top = max(getattr(grid, name))
        if params[name] <= 0:
            warnings.append((name, f"{name} = {params[name]:.4g} <= 0: that term does not fall"))
        elif params[name] > top:
            warnings.append((None, f"{name} = {params[name]:.4g} is beyond the grid's largest "
                                   f"start {top}"))
    for name in ("A", "B"):
        if params[name] > 1e12:
            warnings.append((None, f"{name} = {params[name]:.3g} is huge: that term is poorly "
                                   "determined"))
    if params["E"] >= loss.min():
        warnings.append(("E", f"E = {params['E']:.4g} is not below the lowest observed loss "
                              f"{loss.min():.4g}"))
    if not converged:
        warnings.append((None, "no L-BFGS start reported convergence; the best one is returned"))
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
            "n_dropped": int(drop_highest_loss),
            AT_BOUND: [name for name, _ in warnings if name is not None]}
    return _make_fit("chinchilla", x_names, params, (n, d, loss), best_value,
                     {"huber_delta": float(huber_delta)}, [w for _, w in warnings], info)


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
