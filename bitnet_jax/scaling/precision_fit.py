"""The precision laws of a results table: `bitnet fit TABLE --law precision|qat-gap`.

Unlike the per-recipe laws of `fit`, these fit ACROSS recipes: one law for the whole table, its
variables the bits of each run (the `weight_bits`, `act_bits`, `kv_bits` and `group_size` columns
of `results`). The rows are those `fit.prepare_table` keeps (finished runs, the best over swept
hyperparameters per size and seed), averaged over seeds per (N, D, recipe); bootstrap and holdout
are the machinery of the other laws (`bootstrap_fit`, `holdout.predict_held_out`), held-out sizes
being the K largest (N, D) with every recipe run there.

- `precision`: Kumar et al.'s N_eff law, one gamma per quantized quantity the table pins.
- `qat-gap`: Chen et al.'s gap over a full-precision Chinchilla law, one fit per quantized bit
  setting (`w4a8`, ...: the law has no bits in it), its group sizes varying within.
- `compare_precision_models`: Chinchilla ignoring precision < Kumar's N_eff < a free multiplier
  per recipe (nested), and the QAT gap, scored on the same held-out points.

In fits.json these sit under a top-level "precision" key (`precision_json`), beside "recipes".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import bootstrap_fit
from bitnet_jax.scaling.fit import LawFit, _finite, check_holdout, prepare_table
from bitnet_jax.scaling.holdout import DEFAULT_HOLDOUT, HeldOut, predict_held_out
from bitnet_jax.scaling.laws import Fit
from bitnet_jax.scaling.noise import Replicates
from bitnet_jax.scaling.precision_laws import (UNQUANTIZED, effective_bits, fit_multiplier_law,
                                               fit_precision_law, fit_qat_gap,
                                               present_quantities)
from bitnet_jax.scaling.results import ACT_BITS, GROUP_SIZE, KV_BITS, WEIGHT_BITS

__all__ = ["PRECISION_LAWS", "PrecisionPoints", "PrecisionHeldOut", "ModelScore",
           "PrecisionFits", "precision_points", "fit_precision_table", "precision_json",
           "format_precision"]

PRECISION_LAWS = ("precision", "qat-gap")
Table = Union[str, Path, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True, eq=False)
class PrecisionPoints:
    """Mean loss per (N, D, recipe) over seeds: `reps.x` = (N, D, P_w, P_a, P_kv, recipe index,
    group size or 0); `recipes` the names by index, the unquantized reference first."""

    reps: Replicates
    recipes: tuple[str, ...]

    def recipe(self, i: int) -> str:
        return self.recipes[int(self.reps.x[5][i])]

    def setting(self, i: int) -> str:
        """The bit setting of point i, e.g. w4a8 (kv16 left out), w1.58a8kv3."""
        w, a, kv = (self.reps.x[j][i] for j in (2, 3, 4))
        name = f"w{_bits(w)}a{_bits(a)}"
        return name + (f"kv{_bits(kv)}" if kv < UNQUANTIZED else "")

    def unquantized(self) -> np.ndarray:
        return np.all([self.reps.x[j] >= UNQUANTIZED for j in (2, 3, 4)], axis=0)


def _bits(value: float) -> str:
    return "1.58" if abs(value - np.log2(3)) < 0.01 else f"{value:g}"


@dataclass(frozen=True)
class PrecisionHeldOut(HeldOut):
    """A held-out point of a precision law: which recipe and bits it was."""

    recipe: str = ""
    bits: tuple[float, float, float] = (UNQUANTIZED,) * 3

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "recipe": self.recipe, "weight_bits": self.bits[0],
                "act_bits": self.bits[1], "kv_bits": self.bits[2]}


@dataclass(frozen=True)
class ModelScore:
    """One model of the comparison: its parameter count, in-sample RMSE of log loss, and its
    error on the held-out points every model predicted (None without a holdout)."""

    model: str
    n_params: int
    rmse_log: float
    held_out: int
    mean_abs_rel_error: Optional[float]
    rmse_log_held: Optional[float]
    inside: Optional[float]  # share of held-out points inside their 95% band

    def to_json(self) -> dict[str, Any]:
        return _finite(dict(self.__dict__))


@dataclass(frozen=True, eq=False)
class PrecisionFits:
    """The precision laws of a table: `fits` of the law asked for, by name ("all" for the one
    precision law; the bit setting, e.g. "w4a8", for each QAT gap); `laws` every law fitted on the
    way (law -> name -> fit); the model comparison, notes, the columns used."""

    law: str
    fits: dict[str, LawFit]
    comparison: tuple[ModelScore, ...]
    notes: tuple[str, ...]
    columns: dict[str, str]
    points: PrecisionPoints
    laws: dict[str, dict[str, LawFit]]


# ----------------------------------------------------------------------------------------------
# Points.

def _bits_column(rows: list[dict], column: str, notes: list[str]) -> np.ndarray:
    values = [row.get(column) for row in rows]
    if all(v is None or v == "" for v in values):
        notes.append(f"no {column} column: counted as {UNQUANTIZED:g} bits (unquantized)")
    return np.array([UNQUANTIZED if v is None or v == "" else float(v) for v in values])


def precision_points(table: Table, **columns: Any) -> tuple[PrecisionPoints, dict, list[str]]:
    """The table's rows as precision points (see `PrecisionPoints`), the columns used, notes."""
    prepared = prepare_table(table, **columns)
    used = prepared.used
    if "D" not in used:
        raise ConfigError("the precision laws need a token column (tokens, train_tokens or D)")
    rows = prepared.selection.rows
    if not rows:
        raise ConfigError("no finished run with a valid N, D and loss in the table")
    if not any(WEIGHT_BITS in r or ACT_BITS in r or KV_BITS in r for r in rows):
        raise ConfigError(f"the table has no bit columns: add {WEIGHT_BITS}, {ACT_BITS} and "
                          f"{KV_BITS} (bits per run, 16 = unquantized, 1.58 = ternary), as "
                          "`bitnet sweep collect` writes them")
    notes = [f"{group}: {n}" for group, group_notes in prepared.notes.items()
             for n in group_notes]
    bits = [effective_bits(_bits_column(rows, c, notes)) for c in (WEIGHT_BITS, ACT_BITS, KV_BITS)]
    names = [prepared.recipe_of(r) for r in rows]
    unquantized = {n for n, w, a, kv in zip(names, *bits) if min(w, a, kv) >= UNQUANTIZED}
    recipes = sorted(set(names), key=lambda r: (r not in unquantized, r))
    group = np.array([float(r.get(GROUP_SIZE) or 0) for r in rows])
    x = [np.array([r[used["N"]] for r in rows], float), np.array([r[used["D"]] for r in rows],
                                                                  float),
         *bits, np.array([recipes.index(n) for n in names], float), group]
    loss = np.array([r[used["L"]] for r in rows], float)
    return PrecisionPoints(Replicates.from_points(x, loss), tuple(recipes)), used, notes


# ----------------------------------------------------------------------------------------------
# Models: which columns each takes and how it is fitted.

@dataclass(frozen=True)
class _Model:
    name: str
    columns: Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]
    fit: Callable[[tuple[np.ndarray, ...], np.ndarray], Fit]


def _models(points: PrecisionPoints) -> dict[str, _Model]:
    x = points.reps.x
    quantities = present_quantities(x[2], x[3], x[4])
    recipes = list(points.recipes)
    kumar = lambda x: x[:5]  # noqa: E731
    return {
        "chinchilla (no precision)": _Model(
            "chinchilla (no precision)", kumar,
            lambda x, loss: fit_precision_law(*x, loss, quantities=())),
        "precision": _Model("precision", kumar,
                            lambda x, loss: fit_precision_law(*x, loss, quantities=quantities)),
        "multiplier": _Model(
            "multiplier", lambda x: (x[0], x[1], x[5]),
            lambda x, loss: fit_multiplier_law(x[0], x[1], [recipes[int(i)] for i in x[2]],
                                               loss, recipes=recipes))}


def _gap_model(setting: str) -> _Model:
    def columns(x):
        return x[0], x[1], np.where(x[6] >= 2, x[6], 2.0), \
            np.any([x[j] < UNQUANTIZED for j in (2, 3, 4)], axis=0).astype(float)

    return _Model(f"qat-gap {setting}", columns, lambda x, loss: fit_qat_gap(*x, loss))


def _boot(fit: Fit, reps: Replicates, n_boot: int, seed: int, level: float) -> Fit:
    if not n_boot:
        return fit
    resample = reps.resampler() if reps.has_replicates else None
    return bootstrap_fit(fit, n_boot=n_boot, seed=seed, level=level, resample=resample)


def _split_sizes(reps: Replicates, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept and held out: every point at the k largest (N, D) (by N x D)."""
    sizes = reps.x[0] * reps.x[1]
    largest = np.unique(sizes)[::-1][:k]
    held = np.isin(sizes, largest)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _fit_model(model: _Model, points: PrecisionPoints, index: np.ndarray, holdout: int,
               n_boot: int, seed: int, level: float) -> LawFit:
    reps = points.reps.subset(index)
    mapped = Replicates(tuple(model.columns(reps.x)), reps.losses)
    fit = _boot(model.fit(mapped.x, mapped.means), mapped, n_boot, seed, level)
    if holdout == 0:
        return LawFit(model.name, fit, (), fit.warnings)
    if len(np.unique(reps.x[0] * reps.x[1])) <= holdout:
        return LawFit(model.name, fit, (), fit.warnings + (
            f"no holdout: {holdout} held-out size(s) leave nothing to fit",))
    kept, held = _split_sizes(reps, holdout)
    rest = mapped.subset(kept)
    try:
        rest_fit = _boot(model.fit(rest.x, rest.means), rest, n_boot, seed, level)
    except ConfigError as error:
        return LawFit(model.name, fit, (), fit.warnings + (
            f"not validated by holdout: without its {holdout} largest size(s) the law cannot "
            f"be fitted ({error})",))
    predicted = predict_held_out(rest_fit, rest, mapped.subset(held), level=level, seed=seed)
    tagged = tuple(PrecisionHeldOut(**h.__dict__, recipe=points.recipe(index[i]),
                                    bits=tuple(float(reps.x[j][i]) for j in (2, 3, 4)))
                   for h, i in zip(predicted, held))
    return LawFit(model.name, fit, tagged, fit.warnings)


# ----------------------------------------------------------------------------------------------
# The table's fits and the comparison.

def _score(law: LawFit, common: set) -> ModelScore:
    held = [h for h in law.holdout if (h.recipe, h.N, h.D) in common]
    errors = np.array([h.rel_error for h in held])
    logs = np.array([np.log(h.predicted / h.observed) for h in held])
    inside = [h.inside for h in held if h.inside is not None]
    fit = law.fit
    return ModelScore(law.name, len(fit.params),
                      float(np.sqrt(np.mean(np.log(fit.data[-1] / fit.predict(*fit.data[:-1]))
                                            ** 2))),
                      len(held), float(np.mean(np.abs(errors))) if held else None,
                      float(np.sqrt(np.mean(logs ** 2))) if held else None,
                      float(np.mean(inside)) if inside else None)


def _gap_settings(points: PrecisionPoints) -> dict[str, np.ndarray]:
    """Index of the points of each quantized bit setting, with the unquantized points."""
    base = np.flatnonzero(points.unquantized())
    settings: dict[str, list[int]] = {}
    for i in np.flatnonzero(~points.unquantized()):
        settings.setdefault(points.setting(i), []).append(int(i))
    return {s: np.sort(np.concatenate([base, idx])) for s, idx in settings.items()}


# Fewer resamples than the per-recipe laws: every model (Kumar's, the multiplier, the QAT gap
# per setting) is refitted per resample and per held-out split, minutes at 1000 on a CPU. 200
# keeps the intervals at their nominal coverage (tests/test_precision_laws.py, 50 draws).
PRECISION_N_BOOT = 200


def fit_precision_table(table: Table, *, law: str = "precision",
                        holdout: int = DEFAULT_HOLDOUT, n_boot: int = PRECISION_N_BOOT,
                        seed: int = 0, level: float = 0.95, compare: bool = True,
                        **columns: Any) -> PrecisionFits:
    """Fit a precision law (`law` in PRECISION_LAWS) to a results table, with bootstrap
    intervals, predictions of the `holdout` largest (N, D) sizes from the rest and, with
    `compare`, every model scored on the same held-out points. `columns` as `fit.prepare_table`
    (params_column, tokens_column, loss_column, recipe_column, hyperparameters)."""
    if law not in PRECISION_LAWS:
        raise ConfigError(f"--law {law!r}: choose one of {', '.join(PRECISION_LAWS)}")
    check_holdout(holdout)
    points, used, notes = precision_points(table, **columns)
    everything = np.arange(len(points.reps))
    models = _models(points)
    fitted: dict[str, LawFit] = {}
    candidates = dict(models) if compare else \
        ({"precision": models["precision"]} if law == "precision" else {})
    gap_fits: dict[str, LawFit] = {}
    if law == "qat-gap" or compare:
        settings = _gap_settings(points)
        if not points.unquantized().any():
            notes.append("QAT gap not fitted: no unquantized (16-bit) runs to fit its base law")
            settings = {}
        for setting, index in settings.items():
            try:
                gap_fits[setting] = _fit_model(_gap_model(setting), points, index, holdout,
                                               n_boot, seed, level)
            except ConfigError as error:
                notes.append(f"QAT gap {setting} not fitted: {error}")
    for name, model in candidates.items():
        try:
            fitted[name] = _fit_model(model, points, everything, holdout, n_boot, seed, level)
        except ConfigError as error:
            notes.append(f"{name} not fitted: {error}")
    comparison = _compare(fitted, gap_fits, points) if compare and holdout else ()
    laws = {**({"precision": {"all": fitted["precision"]}} if "precision" in fitted else {}),
            **({"qat-gap": gap_fits} if gap_fits else {})}
    return PrecisionFits(law, laws.get(law, {}), comparison, tuple(notes), used, points, laws)


def _compare(fitted: Mapping[str, LawFit], gap_fits: Mapping[str, LawFit],
             points: PrecisionPoints) -> tuple[ModelScore, ...]:
    keyed = {name: law for name, law in fitted.items() if law.holdout}
    if gap_fits:  # the gap laws together are one model: each predicts its own setting
        held = {}
        for law in gap_fits.values():
            for h in law.holdout:
                held.setdefault((h.recipe, h.N, h.D), h)
        some = next(iter(gap_fits.values()))
        pooled = LawFit("qat-gap", some.fit, tuple(held.values()))
        n_params = sum(len(g.fit.params) for g in gap_fits.values()) \
            - 5 * (len(gap_fits) - 1)  # one shared base law
        keyed["qat-gap"] = pooled
    else:
        n_params = 0
    if not keyed:
        return ()
    common = set.intersection(*({(h.recipe, h.N, h.D) for h in law.holdout}
                                for law in keyed.values()))
    scores = []
    for name, law in keyed.items():
        score = _score(law, common)
        if name == "qat-gap":
            fits = [g.fit for g in gap_fits.values()]
            rmse = float(np.sqrt(np.mean(np.concatenate(
                [np.log(f.data[-1] / f.predict(*f.data[:-1])) ** 2 for f in fits]))))
            score = ModelScore("qat-gap", n_params, rmse, score.held_out,
                               score.mean_abs_rel_error, score.rmse_log_held, score.inside)
        scores.append(score)
    return tuple(scores)


# ----------------------------------------------------------------------------------------------
# Output.

def precision_json(result: PrecisionFits) -> dict[str, Any]:
    """The fits as fits.json's top-level "precision" entry (beside "recipes", whose schema is
    unchanged): {laws: {"precision": {"all": law}, "qat-gap": {"w4a8": law, ...}}, comparison:
    [{model, n_params, rmse_log, held_out, mean_abs_rel_error, rmse_log_held, inside}], notes,
    columns, recipes}; each law in the schema of a per-recipe law (params, interval, r2, points,
    warnings, holdout), its held-out points also naming their recipe and bits."""
    return {"laws": {law: {name: fit.to_json() for name, fit in fits.items()}
                     for law, fits in result.laws.items()},
            "comparison": [s.to_json() for s in result.comparison],
            "notes": list(result.notes), "columns": dict(result.columns),
            "recipes": list(result.points.recipes)}


def format_precision(result: PrecisionFits) -> str:
    """Printable summary of `fit_precision_table`."""
    blocks = []
    for name, law in result.fits.items():
        lines = [f"== {result.law} ({name}): {law.fit.n_points} points (mean loss per N, D, "
                 "recipe)", law.fit.summary()]
        lines += [f"  warning: {w}" for w in law.warnings if w not in law.fit.warnings]
        for h in law.holdout:
            band = f" [{h.low:.4g}, {h.high:.4g}]" if h.low is not None else ""
            lines.append(f"  held out {h.recipe} at N = {h.N:.4g}, D = {h.D:.4g}: predicted "
                         f"{h.predicted:.4g}{band}, observed {h.observed:.4g} "
                         f"({100 * h.rel_error:+.2f}%)")
        blocks.append("\n".join(lines))
    if not result.fits:
        blocks.append(f"== {result.law}: not fitted")
    if result.comparison:
        lines = ["== models by held-out error (the same held-out points for each)",
                 f"  {'model':<28} {'params':>6} {'RMSE log (fit)':>15} {'held out':>8} "
                 f"{'mean |rel err|':>14} {'inside 95%':>10}"]
        for s in result.comparison:
            err = "-" if s.mean_abs_rel_error is None else f"{100 * s.mean_abs_rel_error:.2f}%"
            inside = "-" if s.inside is None else f"{100 * s.inside:.0f}%"
            lines.append(f"  {s.model:<28} {s.n_params:>6} {s.rmse_log:>15.4g} "
                         f"{s.held_out:>8} {err:>14} {inside:>10}")
        blocks.append("\n".join(lines))
    if result.notes:
        blocks.append("\n".join(f"note: {n}" for n in result.notes))
    return "\n\n".join(blocks)
