"""Precision-aware scaling laws: Kumar et al.'s effective parameters, Chen et al.'s QAT gap, and
a free effective-parameter multiplier per recipe (the model both are nested in or compared with).

- `fit_precision_law`: L = A N_eff^-alpha + B D^-beta + E, N_eff = N prod_q (1 - exp(-P_q /
  gamma_q)) over the quantized quantities q in (w, a, kv) (Kumar et al. 2024, "Scaling Laws for
  Precision"); P in bits, ternary as log2(3), 16 bits or more counted as unquantized (factor 1).
  With no quantity it is Chinchilla's L(N, D), the base of the QAT gap.
- `fit_multiplier_law`: the same Chinchilla form with N_eff = m_r N, one free m per recipe (1 for
  the unquantized reference): what any N_eff law can at best do.
- `fit_qat_gap`: L = Chinchilla(N, D) + delta, delta = k D^gamma_D (log2 G)^gamma_G / N^gamma_N on
  the quantized rows (Chen et al. 2025), Chinchilla fitted on the full-precision rows first.

Objective: least squares of log L - log(predicted) (scipy's bounded trust-region solver, analytic
Jacobian, from a small grid of starts), as the other laws weigh every point by its relative error.
With fewer than 3 distinct token counts, E + B D^-beta is not identified, so beta is tied to alpha
(Chen et al. fit alpha = beta) and the fit says so. Every law registers its formula in
`laws._LAWS` and its fast refit from the point estimate in `bootstrap._REFIT`, so `bootstrap_fit`,
`Fit.predict` and `holdout.predict_held_out` work on them unchanged. numpy and scipy only.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import _REFIT
from bitnet_jax.scaling.laws import _LAWS, Fit, _goodness, _one_blas_thread

__all__ = ["QUANTITIES", "LOG2_3", "UNQUANTIZED", "effective_bits", "precision_factor",
           "fit_precision_law", "fit_multiplier_law", "fit_qat_gap", "GAP_PARAMS"]

QUANTITIES = ("w", "a", "kv")  # weights, activations (inputs of the linears), KV cache
LOG2_3 = math.log2(3)  # the information of one ternary weight
UNQUANTIZED = 16.0  # bits at or above which a quantity counts as full precision (factor 1)
CHINCHILLA = ("A", "B", "E", "alpha", "beta")
GAP_PARAMS = ("k", "gamma_N", "gamma_D", "gamma_G")
GAMMA_BOUNDS = (0.05, 50.0)  # bits
EXPONENT_MAX = 5.0


def effective_bits(bits: Any) -> np.ndarray:
    """Bits as the law reads them: 1.58 (a ternary recipe's label) is log2(3) = 1.585."""
    p = np.asarray(bits, dtype=float)
    return np.where(np.abs(p - LOG2_3) < 0.01, LOG2_3, p)


def precision_factor(bits: Any, gamma: Any) -> np.ndarray:
    """1 - exp(-P / gamma), and 1 where P counts as unquantized (>= 16 bits)."""
    p = np.asarray(bits, dtype=float)
    return np.where(p >= UNQUANTIZED, 1.0, -np.expm1(-np.minimum(p, UNQUANTIZED) / gamma))


# ----------------------------------------------------------------------------------------------
# Forms (params may hold arrays of bootstrap samples: everything broadcasts).

def _chinchilla(p: Mapping[str, Any], log_neff: Any, d: Any) -> Any:
    # A or B may be 0 (fitted at one data size, B is; the main job's report warned of it): the
    # log is -inf and the term 0, as meant
    with np.errstate(divide="ignore"):
        return (p["E"] + np.exp(np.log(p["A"]) - p["alpha"] * log_neff)
                + np.exp(np.log(p["B"]) - p["beta"] * np.log(d)))


def _eval_precision(p: Mapping[str, Any], n, d, pw, pa, pkv) -> np.ndarray:
    log_neff = np.log(n)
    for q, bits in zip(QUANTITIES, (pw, pa, pkv)):
        if f"gamma_{q}" in p:
            log_neff = log_neff + np.log(precision_factor(bits, p[f"gamma_{q}"]))
    return _chinchilla(p, log_neff, d)


def _gap(p: Mapping[str, Any], n, d, g) -> Any:
    log_g = np.log(np.log2(np.maximum(g, 2.0)))
    gamma_g = p.get("gamma_G", 0.0)
    return p["k"] * np.exp(p["gamma_D"] * np.log(d) + gamma_g * log_g - p["gamma_N"] * np.log(n))


def _eval_qat_gap(p: Mapping[str, Any], n, d, g, quantized) -> np.ndarray:
    g = np.where(quantized > 0, g, 2.0)  # full-precision rows carry no group size
    return _chinchilla(p, np.log(n), d) + np.where(quantized > 0, _gap(p, n, d, g), 0.0)


def _precision_key(quantities: Sequence[str]) -> str:
    key = f"precision[{','.join(quantities)}]"
    if key not in _LAWS:
        _LAWS[key] = (CHINCHILLA + tuple(f"gamma_{q}" for q in quantities), _eval_precision)
        _REFIT[key] = _refit_effective
    return key


def _multiplier_key(recipes: Sequence[str]) -> str:
    """Law key of the multiplier model over `recipes` (the first is the reference, m = 1)."""
    key = "multiplier[" + "|".join(recipes) + "]"
    if key not in _LAWS:
        names = tuple(f"m[{r}]" for r in recipes[1:])

        def evaluate(p: Mapping[str, Any], n, d, r) -> np.ndarray:
            log_m = sum(np.where(r == i + 1, np.log(p[name]), 0.0) for i, name in
                        enumerate(names))
            return _chinchilla(p, np.log(n) + log_m, d)

        _LAWS[key] = (CHINCHILLA + names, evaluate)
        _REFIT[key] = _refit_effective
    return key


def _gap_key(with_group: bool) -> str:
    key = "qat_gap" if with_group else "qat_gap[one G]"
    if key not in _LAWS:
        names = GAP_PARAMS if with_group else GAP_PARAMS[:3]
        _LAWS[key] = (names + CHINCHILLA, _eval_qat_gap)
        _REFIT[key] = _refit_gap
    return key


# ----------------------------------------------------------------------------------------------
# The effective-parameter solver: theta = (cA, cB, e, alpha, [beta], extras...), centred logs.

class _Effective:
    """log N_eff = log N + offset(extras) for one data set: Kumar's factors or free multipliers."""

    def __init__(self, kind: str, x: tuple[np.ndarray, ...], n_extra: int, tie: bool):
        self.kind, self.x, self.n_extra, self.tie = kind, x, n_extra, tie
        self.log_n, self.log_d = np.log(x[0]), np.log(x[1])

    def offset(self, extras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log N_eff - log N and its derivative in the extras (points x n_extra)."""
        n = len(self.log_n)
        if self.kind == "multiplier":
            r = self.x[2].astype(int)
            jac = np.stack([(r == i + 1).astype(float) for i in range(self.n_extra)], axis=1) \
                if self.n_extra else np.zeros((n, 0))
            return jac @ extras if self.n_extra else np.zeros(n), jac
        total, cols = np.zeros(n), []
        for bits, lg in zip(self.bits, extras):
            g = math.exp(lg)
            quantized = bits < UNQUANTIZED
            p = np.where(quantized, bits, 1.0)
            u = np.exp(-p / g)
            f = 1.0 - u
            total = total + np.where(quantized, np.log(f), 0.0)
            cols.append(np.where(quantized, -u * (p / g) / f, 0.0))
        return total, (np.stack(cols, axis=1) if cols else np.zeros((n, 0)))

    def unpack(self, theta: np.ndarray) -> tuple[float, float, float, float, float, np.ndarray]:
        ca, cb, e, alpha = theta[:4]
        beta = alpha if self.tie else theta[4]
        return ca, cb, e, alpha, beta, theta[4 if self.tie else 5:]

    def residuals_and_jac(self, theta, log_l, x0, y0):
        ca, cb, e, alpha, beta, extras = self.unpack(theta)
        off, off_jac = self.offset(extras)
        xn, yd = self.log_n + off - x0, self.log_d - y0
        t_n, t_d, t_e = np.exp(ca - alpha * xn), np.exp(cb - beta * yd), math.exp(e)
        pred = t_n + t_d + t_e
        cols = [t_n, t_d, np.full_like(pred, t_e),
                -t_n * xn - (t_d * yd if self.tie else 0.0)]
        if not self.tie:
            cols.append(-t_d * yd)
        jac = np.column_stack(cols + [(-alpha * t_n)[:, None] * off_jac])
        return log_l - np.log(pred), -jac / pred[:, None]


def _bounds(eff: _Effective, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    extra_lo, extra_hi = ((math.log(GAMMA_BOUNDS[0]), math.log(GAMMA_BOUNDS[1]))
                          if eff.kind == "kumar" else (-10.0, 10.0))
    n_exp = 1 if eff.tie else 2
    lower = [-np.inf, -np.inf, -12.0] + [0.0] * n_exp + [extra_lo] * eff.n_extra
    upper = [np.inf, np.inf, math.log(float(loss.min()))] + [EXPONENT_MAX] * n_exp \
        + [extra_hi] * eff.n_extra
    return np.array(lower), np.array(upper)


def _least_squares(fun_jac: Callable, theta0: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                   refit: bool) -> optimize.OptimizeResult:
    """scipy's least squares rather than our own Gauss-Newton: MINPACK's Levenberg-Marquardt for
    a refit from an interior point estimate (unbounded, ~10x faster than the bounded solver,
    which is what makes bootstraps of hundreds of refits affordable), the bounded trust-region
    solver otherwise and whenever LM leaves the bounds."""
    fun, jac = (lambda t: fun_jac(t)[0]), (lambda t: fun_jac(t)[1])
    if refit and np.all((theta0 > lower) & (theta0 < upper)):
        res = optimize.least_squares(fun, theta0, jac=jac, method="lm")
        if np.all((res.x >= lower) & (res.x <= upper)):
            return res
    return optimize.least_squares(fun, np.clip(theta0, lower + 1e-9, upper - 1e-9), jac=jac,
                                  bounds=(lower, upper), method="trf", x_scale="jac")


def _solve(eff: _Effective, loss: np.ndarray, starts: Sequence[np.ndarray], x0: float,
           y0: float, refit: bool = False) -> Optional[optimize.OptimizeResult]:
    log_l = np.log(loss)
    lower, upper = _bounds(eff, loss)
    cache: dict[bytes, tuple] = {}

    def both(theta):
        key = theta.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = eff.residuals_and_jac(theta, log_l, x0, y0)
        return cache[key]

    best = None
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for theta0 in starts:
            res = _least_squares(both, np.asarray(theta0, float), lower, upper, refit)
            if np.isfinite(res.cost) and np.all(np.isfinite(res.x)) \
                    and (best is None or res.cost < best.cost):
                best = res
    return best


def _starts(eff: _Effective, loss: np.ndarray) -> list[np.ndarray]:
    e_max = float(loss.min())
    extra_grid = [[0.0, math.log(3.0)]] * eff.n_extra if eff.kind == "kumar" \
        else [[0.0]] * eff.n_extra
    starts = []
    for e_frac, alpha, beta in itertools.product((0.5, 0.9), (0.3, 0.7),
                                                 (None,) if eff.tie else (0.3, 0.7)):
        c = math.log(max((float(loss.mean()) - e_frac * e_max) / 2, 1e-3))
        head = [c, c, math.log(e_frac * e_max), alpha] + ([] if eff.tie else [beta])
        starts += [np.array(head + list(extras)) for extras in itertools.product(*extra_grid)]
    return starts


def _params(eff: _Effective, theta: np.ndarray, x0: float, y0: float,
            extra_names: Sequence[str]) -> dict[str, float]:
    ca, cb, e, alpha, beta, extras = (np.asarray(v, float) for v in eff.unpack(theta))
    params = {"A": float(np.exp(ca + alpha * x0)), "B": float(np.exp(cb + beta * y0)),
              "E": float(np.exp(e)), "alpha": float(alpha), "beta": float(beta)}
    for name, v in zip(extra_names, extras):
        params[name] = float(np.exp(v))
    return params


def _theta(eff: _Effective, p: Mapping[str, float], x0: float, y0: float,
           extra_names: Sequence[str]) -> np.ndarray:
    head = [math.log(p["A"]) - p["alpha"] * x0, math.log(p["B"]) - p["beta"] * y0,
            math.log(p["E"]), p["alpha"]] + ([] if eff.tie else [p["beta"]])
    return np.array(head + [math.log(p[name]) for name in extra_names])


def _check(n: np.ndarray, d: np.ndarray, loss: np.ndarray, n_params: int, what: str) -> bool:
    """Validate the data; True when beta must be tied to alpha (< 3 distinct D)."""
    for name, v in (("N", n), ("D", d), ("L", loss)):
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ConfigError(f"{what}: {name} must be finite and positive in every row")
    if len(np.unique(n)) < 3:
        raise ConfigError(f"{what}: needs at least 3 distinct model sizes N, got "
                          f"{len(np.unique(n))}")
    tie = len(np.unique(d)) < 3
    if len(loss) < n_params - tie + 1:
        raise ConfigError(f"{what}: {n_params - tie} parameters need at least "
                          f"{n_params - tie + 1} points, got {len(loss)}")
    return tie


def _effective_fit(kind: str, key: str, x: tuple[np.ndarray, ...], loss: np.ndarray,
                   extra_names: Sequence[str], form: str, x_names: tuple[str, ...],
                   what: str) -> Fit:
    tie = _check(x[0], x[1], loss, 5 + len(extra_names), what)
    eff = _Effective(kind, x, len(extra_names), tie)
    x0, y0 = float(eff.log_n.mean()), float(eff.log_d.mean())
    if kind == "kumar":
        eff.bits = x[2:]
    best = _solve(eff, loss, _starts(eff, loss), x0, y0)
    if best is None:
        raise ConfigError(f"{what}: no start gave a finite fit")
    params = _params(eff, best.x, x0, y0, extra_names)
    warnings = []
    if tie:
        warnings.append(f"{len(np.unique(x[1]))} distinct token count(s): beta is tied to "
                        "alpha (E + B D^-beta needs at least 3)")
    for name in ("alpha", "beta"):
        if params[name] >= EXPONENT_MAX * (1 - 1e-6) or params[name] <= 1e-6:
            warnings.append(f"{name} = {params[name]:.4g} is at a bound")
    for name in extra_names:
        if kind == "kumar" and not GAMMA_BOUNDS[0] * 1.001 < params[name] < GAMMA_BOUNDS[1] / 1.001:
            warnings.append(f"{name} = {params[name]:.4g} bits is at a bound {GAMMA_BOUNDS}: "
                            "the data do not pin it")
    predicted = _LAWS[key][1](params, *x)
    r2, rmse, residuals = _goodness(loss, predicted)
    options = {"tie": tie, "x0": x0, "y0": y0, "kind": kind, "extra_names": tuple(extra_names)}
    return Fit(law=key, form=form, x_names=x_names, params=params, r2=r2, rmse=rmse,
               residuals=residuals, n_points=len(loss), objective=float(2 * best.cost),
               data=(*x, loss), options=options, warnings=tuple(warnings),
               info={"n_starts": len(_starts(eff, loss))})


def _refit_effective(data: tuple[np.ndarray, ...], point: Fit) -> Optional[np.ndarray]:
    *x, loss = data
    o = point.options
    if len(np.unique(x[0])) < 3 or (not o["tie"] and len(np.unique(x[1])) < 3):
        return None
    eff = _Effective(o["kind"], tuple(x), len(o["extra_names"]), o["tie"])
    if o["kind"] == "kumar":
        eff.bits = tuple(x[2:])
    best = _solve(eff, loss, [_theta(eff, point.params, o["x0"], o["y0"], o["extra_names"])],
                  o["x0"], o["y0"], refit=True)
    if best is None:
        return None
    p = _params(eff, best.x, o["x0"], o["y0"], o["extra_names"])
    return np.array([p[k] for k in point.param_names])


# ----------------------------------------------------------------------------------------------
# The public fitters.

def present_quantities(pw: Any, pa: Any, pkv: Any) -> tuple[str, ...]:
    """The quantities whose gamma the data can pin: quantized somewhere and at >= 2 bit widths
    (16 counts as one: the unquantized reference)."""
    out = []
    for q, bits in zip(QUANTITIES, (pw, pa, pkv)):
        bits = effective_bits(bits)
        if np.any(bits < UNQUANTIZED) and len(np.unique(np.minimum(bits, UNQUANTIZED))) >= 2:
            out.append(q)
    return tuple(out)


def _require_separable(quantities: Sequence[str], bits: tuple[np.ndarray, ...]) -> None:
    """Each bit setting (the tuple of bits over `quantities`) gives the law one N_eff ratio, so
    k gammas need k + 1 settings: bf16 against b1.58 alone moves weights and activations
    together and cannot tell gamma_w from gamma_a."""
    columns = [np.minimum(bits[QUANTITIES.index(q)], UNQUANTIZED) for q in quantities]
    settings = len({tuple(row) for row in np.stack(columns, axis=1)}) if columns else 1
    if len(quantities) > settings - 1:
        raise ConfigError(
            f"precision law: {settings} bit setting(s) of ({', '.join(quantities)}) cannot "
            f"separate {len(quantities)} gammas (each needs a setting of its own); add recipes "
            "that vary one quantity alone (e.g. w2a16 beside w4a8) or fit fewer quantities")


def fit_precision_law(N: Any, D: Any, weight_bits: Any, act_bits: Any, kv_bits: Any, L: Any, *,
                      quantities: Optional[Sequence[str]] = None) -> Fit:
    """Fit Kumar et al.'s L = A N_eff^-alpha + B D^-beta + E across recipes (module docstring).

    `quantities` (default: every one the data can pin, `present_quantities`) get a gamma each,
    named gamma_w, gamma_a, gamma_kv; the others count as unquantized.
    """
    x = tuple(np.asarray(v, float) for v in (N, D)) \
        + tuple(effective_bits(v) for v in (weight_bits, act_bits, kv_bits))
    loss = np.asarray(L, float)
    quantities = present_quantities(*x[2:]) if quantities is None else tuple(quantities)
    unknown = set(quantities) - set(QUANTITIES)
    if unknown:
        raise ConfigError(f"unknown quantities {sorted(unknown)}; choose from {QUANTITIES}")
    _require_separable(quantities, x[2:])
    names = tuple(f"gamma_{q}" for q in quantities)
    factors = " ".join(f"(1 - exp(-P_{q}/gamma_{q}))" for q in quantities) or "(no quantity)"
    return _effective_fit("kumar", _precision_key(quantities), x, loss, names,
                          f"L = A N_eff^-alpha + B D^-beta + E, N_eff = N {factors}",
                          ("N", "D", "P_w", "P_a", "P_kv"), "precision law")


def fit_multiplier_law(N: Any, D: Any, recipe: Sequence[str], L: Any, *,
                       recipes: Optional[Sequence[str]] = None) -> Fit:
    """Chinchilla with N_eff = m_r N, one free multiplier per recipe; parameters A, B, E, alpha,
    beta and m[recipe]. `recipes` orders them (default: as first seen); the first is the
    reference, with m = 1 (e.g. bf16). The fit's `recipe` variable is the index in that order."""
    recipes = list(dict.fromkeys(str(r) for r in recipe)) if recipes is None else list(recipes)
    missing = sorted({str(r) for r in recipe} - set(recipes))
    if missing:
        raise ConfigError(f"recipes {missing} are not in the list of recipes {recipes}")
    index = np.array([recipes.index(str(r)) for r in recipe], float)
    key = _multiplier_key(recipes)
    x = (np.asarray(N, float), np.asarray(D, float), index)
    return _effective_fit("multiplier", key, x, np.asarray(L, float),
                          _LAWS[key][0][len(CHINCHILLA):],
                          f"L = A (m_recipe N)^-alpha + B D^-beta + E, m[{recipes[0]}] = 1",
                          ("N", "D", "recipe"), "effective-parameter multiplier law")


# ----------------------------------------------------------------------------------------------
# The QAT gap over a full-precision Chinchilla law.

def _gap_solve(base: Mapping[str, float], n, d, g, loss, starts, centre, with_group: bool,
               refit: bool = False):
    x0, y0, z0 = centre
    xn, yd, zg = np.log(n) - x0, np.log(d) - y0, np.log(np.log2(g)) - z0
    chin = _chinchilla(base, np.log(n), d)
    log_l = np.log(loss)

    def residuals_and_jac(theta):
        lk, gn, gd = theta[:3]
        gg = theta[3] if with_group else 0.0
        delta = np.exp(lk - gn * xn + gd * yd + gg * zg)
        pred = chin + delta
        cols = [delta, -delta * xn, delta * yd] + ([delta * zg] if with_group else [])
        return log_l - np.log(pred), -np.column_stack(cols) / pred[:, None]

    m = 4 if with_group else 3
    lower, upper = np.array([-30.0] + [-3.0] * (m - 1)), np.array([30.0] + [3.0] * (m - 1))
    best = None
    with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for theta0 in starts:
            res = _least_squares(residuals_and_jac, np.asarray(theta0, float), lower, upper,
                                 refit)
            if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
                best = res
    return best


def _gap_params(theta, centre, with_group) -> dict[str, float]:
    x0, y0, z0 = centre
    lk, gn, gd = (float(v) for v in theta[:3])
    gg = float(theta[3]) if with_group else 0.0
    out = {"k": math.exp(lk + gn * x0 - gd * y0 - gg * z0), "gamma_N": gn, "gamma_D": gd}
    if with_group:
        out["gamma_G"] = gg
    return out


def _gap_theta(p, centre, with_group) -> np.ndarray:
    x0, y0, z0 = centre
    gg = p.get("gamma_G", 0.0)
    lk = math.log(p["k"]) - p["gamma_N"] * x0 + p["gamma_D"] * y0 + gg * z0
    return np.array([lk, p["gamma_N"], p["gamma_D"]] + ([gg] if with_group else []))


def _gap_starts(base, n, d, g, loss, centre, with_group) -> list[np.ndarray]:
    gap = loss - _chinchilla(base, np.log(n), d)
    mean = float(np.mean(np.abs(gap))) or 1e-3
    starts = [np.array([math.log(mean), 0.0, 0.0] + ([0.0] if with_group else []))]
    positive = gap > 0
    if positive.sum() > (4 if with_group else 3):  # log-linear regression on the positive gaps
        x0, y0, z0 = centre
        cols = [np.ones(positive.sum()), -(np.log(n) - x0)[positive], (np.log(d) - y0)[positive]]
        if with_group:
            cols.append((np.log(np.log2(g)) - z0)[positive])
        coef, *_ = np.linalg.lstsq(np.column_stack(cols), np.log(gap[positive]), rcond=None)
        starts.append(coef)
    return starts


def _split_gap_data(data):
    n, d, g, q, loss = data
    full, quant = q == 0, q > 0
    return (n[full], d[full], loss[full]), (n[quant], d[quant], g[quant], loss[quant])


def fit_qat_gap(N: Any, D: Any, group_size: Any, quantized: Any, L: Any) -> Fit:
    """Fit Chen et al.'s QAT gap: Chinchilla on the rows with `quantized` false (full precision),
    then delta = k D^gamma_D (log2 G)^gamma_G / N^gamma_N on the others (G = `group_size`, >= 2:
    the inputs sharing one weight scale). With one group size, (log2 G)^gamma_G is a constant k
    absorbs: gamma_G is left out (a warning says so). Parameters k, gamma_N, gamma_D, gamma_G and
    the base's A, B, E, alpha, beta; bootstrap refits redo both stages."""
    n, d, g, q, loss = (np.asarray(v, float) for v in (N, D, group_size, quantized, L))
    q = (q > 0).astype(float)
    (fn, fd, fl), (qn, qd, qg, ql) = _split_gap_data((n, d, g, q, loss))
    if len(ql) == 0:
        raise ConfigError("QAT gap: no quantized rows to fit the gap to")
    if not np.all(np.isfinite(qg) & (qg >= 2)):
        raise ConfigError("QAT gap: every quantized row needs a group_size >= 2 (the inputs "
                          "sharing one weight scale; a table from `bitnet sweep` has it)")
    base = fit_precision_law(fn, fd, *(np.full(len(fn), UNQUANTIZED),) * 3, fl, quantities=())
    with_group = len(np.unique(qg)) >= 2
    needed = 4 if with_group else 3
    if len(np.unique(qn)) < 2 or len(np.unique(qd)) < 2 or len(ql) <= needed:
        raise ConfigError(f"QAT gap: needs >= 2 distinct N and D among the quantized rows and "
                          f"more than {needed} of them, got {len(ql)}")
    centre = (float(np.log(qn).mean()), float(np.log(qd).mean()),
              float(np.log(np.log2(qg)).mean()))
    best = _gap_solve(base.params, qn, qd, qg, ql,
                      _gap_starts(base.params, qn, qd, qg, ql, centre, with_group), centre,
                      with_group)
    if best is None:
        raise ConfigError("QAT gap: no start gave a finite fit")
    key = _gap_key(with_group)
    params = {**_gap_params(best.x, centre, with_group), **base.params}
    warnings = list(base.warnings)
    if not with_group:
        warnings.append(f"one group size ({qg[0]:g}): gamma_G is not identified and left out")
    data = (n, d, np.where(q > 0, g, 2.0), q, loss)
    r2, rmse, residuals = _goodness(loss, _LAWS[key][1](params, *data[:-1]))
    options = {"centre": centre, "with_group": with_group, "base": base.options}
    return Fit(law=key, form="L = E + A N^-alpha + B D^-beta + k D^gamma_D (log2 G)^gamma_G / "
               "N^gamma_N", x_names=("N", "D", "G", "quantized"), params=params, r2=r2,
               rmse=rmse, residuals=residuals, n_points=len(loss),
               objective=float(2 * best.cost), data=data, options=options,
               warnings=tuple(warnings), info={"base_rows": len(fl), "gap_rows": len(ql)})


def _refit_gap(data: tuple[np.ndarray, ...], point: Fit) -> Optional[np.ndarray]:
    (fn, fd, fl), (qn, qd, qg, ql) = _split_gap_data(data)
    o = point.options
    base_o = o["base"]
    if len(np.unique(fn)) < 3 or (not base_o["tie"] and len(np.unique(fd)) < 3) or len(ql) < 2:
        return None
    eff = _Effective("kumar", (fn, fd), 0, base_o["tie"])
    eff.bits = ()
    base_point = {k: point.params[k] for k in CHINCHILLA}
    res = _solve(eff, fl, [_theta(eff, base_point, base_o["x0"], base_o["y0"], ())],
                 base_o["x0"], base_o["y0"], refit=True)
    if res is None:
        return None
    base = _params(eff, res.x, base_o["x0"], base_o["y0"], ())
    gap = _gap_solve(base, qn, qd, qg, ql,
                     [_gap_theta(point.params, o["centre"], o["with_group"])], o["centre"],
                     o["with_group"], refit=True)
    if gap is None:
        return None
    p = {**_gap_params(gap.x, o["centre"], o["with_group"]), **base}
    return np.array([p[k] for k in point.param_names])


PRECISION_FITTERS: dict[str, Callable[..., Fit]] = {
    "precision": fit_precision_law, "multiplier": fit_multiplier_law, "qat-gap": fit_qat_gap}
