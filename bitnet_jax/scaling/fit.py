"""The one fitter of a results table: `bitnet fit TABLE.csv` and `bitnet sweep report` both call
`fit_table`, with the same defaults, so they print the same laws for the same table.

Per recipe: the finished runs; the best run over the hyperparameter axes per (N, D, seed)
(`select`); the mean loss per size over its seeds (`noise`); then every law of `LAWS` (L(N) =
E + A N^-alpha, L(N) = A N^-alpha and, where the token count varies, L(N, D)), each with bootstrap
intervals (drawn from the measured seed spread where sizes have replicates) and validated by
predicting the largest sizes from the others (`holdout`). `format_fits` prints them, `fits_json`
gives them as data (fits.json). numpy and scipy only, like `laws`.

A law is registered with `register_law(TableLaw(name, kind, label, variables, form, fit,
requires))` (its formula and parameter names in `laws._LAWS`, its refit in `bootstrap._REFIT`).
The precision laws (`precision_laws`) register their formulas and refits the same way but fit
across recipes, one law for the whole table (`precision_fit`, `bitnet fit --law`), on the rows
`prepare_table` selects here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import DEFAULT_N_BOOT, bootstrap_fit
from bitnet_jax.scaling.compare import effective_parameter_multiplier, loss_ratio
from bitnet_jax.scaling.holdout import DEFAULT_HOLDOUT, HeldOut, predict_held_out, split_largest
from bitnet_jax.scaling.laws import (_LAWS, EPOCH_GRID, Fit, Grid, fit_chinchilla,
                                     fit_power_law, fit_power_law_with_offset)
from bitnet_jax.scaling.noise import Replicates
from bitnet_jax.scaling.results import (COMPLETED, LOSS_COLUMNS, PARAM_COLUMNS, RECIPE_COLUMNS,
                                        STATUS, TOKEN_COLUMNS, read_table)
from bitnet_jax.scaling.select import (Choice, Selection, axis_values,
                                       default_hyperparameters, select_envelope)
from bitnet_jax.scaling.trust import CHECKS, Check, law_checks, trusted

__all__ = ["TableLaw", "LAWS", "register_law", "LawFit", "RecipeFits", "PreparedTable",
           "prepare_table", "check_holdout", "fit_table", "format_fits", "fits_json",
           "require_a_fit"]


# ----------------------------------------------------------------------------------------------
# The laws a table is fitted with.

@dataclass(frozen=True)
class TableLaw:
    """A law `fit_table` fits per recipe: `name` (its key in fits.json), `kind` (its key in
    `RecipeFits.fits`), `label` (its formula in notes), the `variables` it takes ("N", "D") and
    `fit(x, loss, options) -> Fit` on the per-size means; `requires(replicates, options)` says why
    the law does not apply to a recipe's data (None when it does, "" to skip it silently)."""

    name: str
    kind: str
    label: str
    variables: tuple[str, ...]
    form: str  # its formula's key in `laws` (how `Fit.predict` evaluates it)
    fit: Callable[[tuple[np.ndarray, ...], np.ndarray, Mapping[str, Any]], Fit]
    requires: Callable[[Replicates, Mapping[str, Any]], Optional[str]] = lambda reps, opts: None

    def predict(self, params: Mapping[str, float], *x: Any) -> np.ndarray:
        """The law's loss at x (N, or N and D) from parameters by name, e.g. fits.json's."""
        return np.asarray(_LAWS[self.form][1](params, *(np.asarray(v, float) for v in x)))


LAWS: dict[str, TableLaw] = {}


def register_law(law: TableLaw) -> TableLaw:
    """Add a law to every fit of a results table (in registration order)."""
    LAWS[law.name] = law
    return law


def _needs_tokens(reps: Replicates, options: Mapping[str, Any]) -> Optional[str]:
    if not options["chinchilla"] or len(reps.x) < 2:
        return ""  # not asked for, or no token column: nothing to say
    distinct = len(np.unique(reps.x[1]))
    if distinct < 3:
        return f"{distinct} distinct token count(s); E, B and beta need at least 3"
    return None


# The fitters are looked up when called, so a test may swap one (e.g. a smaller grid).
register_law(TableLaw("L(N)", "offset", "L(N) = E + A N^-alpha", ("N",), "power_law_offset",
                      lambda x, loss, o: fit_power_law_with_offset(x[0], loss)))
register_law(TableLaw("L(N)-pure", "power", "L(N) = A N^-alpha", ("N",), "power_law",
                      lambda x, loss, o: fit_power_law(x[0], loss)))
register_law(TableLaw("L(N,D)", "chinchilla", "L(N, D)", ("N", "D"), "chinchilla",
                      lambda x, loss, o: fit_chinchilla(x[0], x[1], loss,
                                                        huber_delta=o["huber_delta"],
                                                        grid=o["grid"]),
                      _needs_tokens))


# ----------------------------------------------------------------------------------------------
# Results.

@dataclass(frozen=True, eq=False)
class LawFit:
    """One law of one recipe: the bootstrapped `fit` on every size, the predictions of the
    held-out sizes by the law fitted without them, every warning (the fit's own, unbracketed
    hyperparameter optima, a holdout that could not be made) and the `trust` checks."""

    name: str
    fit: Fit
    holdout: tuple[HeldOut, ...] = ()
    warnings: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()

    @property
    def trusted(self) -> bool:
        return trusted(self.checks)

    def to_json(self) -> dict[str, Any]:
        return _finite({
            "params": dict(self.fit.params),
            "interval": {k: list(v) for k, v in self.fit.intervals.items()},
            "r2": self.fit.r2, "points": self.fit.n_points, "warnings": list(self.warnings),
            "holdout": [h.to_json() for h in self.holdout],
            "checks": {c.name: c.to_json() for c in self.checks}})


@dataclass(frozen=True, eq=False)
class RecipeFits:
    """The fits of one recipe's runs, by law name (`laws`); `replicates` the mean loss and seed
    spread per size; `choices` the hyperparameter selection; `notes` what was not fitted and
    why; `runs` the rows fitted (the best run per size and seed)."""

    recipe: str
    n_points: int
    columns: dict[str, str]
    laws: dict[str, LawFit]
    replicates: Optional[Replicates] = None
    choices: tuple[Choice, ...] = ()
    notes: tuple[str, ...] = ()
    runs: tuple[dict, ...] = ()  # the rows fitted: the envelope over the hyperparameters

    @property
    def fits(self) -> dict[str, Fit]:
        """The fits by kind ("offset", "power", "chinchilla", ...)."""
        return {LAWS[name].kind if name in LAWS else name: law.fit
                for name, law in self.laws.items()}

    @property
    def offset(self) -> Optional[Fit]:
        return self.fits.get("offset")

    @property
    def power(self) -> Optional[Fit]:
        return self.fits.get("power")

    @property
    def chinchilla(self) -> Optional[Fit]:
        return self.fits.get("chinchilla")


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------
# Fitting a table.

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


def check_holdout(holdout: Any) -> None:
    if int(holdout) != holdout or holdout < 0:
        raise ConfigError(f"holdout must be a non-negative integer (sizes held out), "
                          f"got {holdout!r}")


def _fit_law(law: TableLaw, reps: Replicates, options: Mapping[str, Any],
             boot: Callable[[Fit, Replicates, TableLaw], Fit]) -> Fit:
    x = reps.x[: len(law.variables)]
    return boot(law.fit(x, reps.means, options), reps, law)


def _holdout(law: TableLaw, reps: Replicates, k: int, options: Mapping[str, Any],
             boot: Callable[[Fit, Replicates, TableLaw], Fit], level: float,
             seed: int) -> tuple[tuple[HeldOut, ...], list[str]]:
    if k == 0:
        return (), []
    if k >= len(reps):
        return (), [f"no holdout: {k} held-out size(s) of {len(reps)} leave nothing to fit"]
    kept, held = split_largest(reps, k)
    rest = reps.subset(kept)
    try:
        fit = _fit_law(law, rest, options, boot)
    except ConfigError as error:
        return (), [f"not validated by holdout: without its {k} largest size(s) the law cannot "
                    f"be fitted ({error})"]
    return predict_held_out(fit, rest, reps.subset(held), level=level, seed=seed), []


@dataclass(frozen=True, eq=False)
class PreparedTable:
    """A results table read and selected as every fit of it sees it: the finished, valid rows'
    envelope over the hyperparameters (`selection`), the columns used by role (`used`: N, L, D,
    recipe), each group's name (`recipe_of`) and the notes per group (rows skipped and why)."""

    selection: Selection
    used: dict[str, str]
    recipe_of: Callable[[Mapping[str, Any]], str]
    notes: dict[str, list[str]]


def prepare_table(table: Union[str, Path, Sequence[Mapping[str, Any]]], *,
                  params_column: Optional[str] = None, tokens_column: Optional[str] = None,
                  loss_column: Optional[str] = None, recipe_column: Optional[str] = None,
                  hyperparameters: Optional[Sequence[str]] = None,
                  select_by: str = "seed") -> PreparedTable:
    """Read, filter and select a results table (see `fit_table` for the rules); the precision
    laws (`precision_fit`) fit the same rows."""
    rows = read_table(table) if isinstance(table, (str, Path)) else [dict(r) for r in table]
    if not rows:
        raise ConfigError("the results table has no rows")
    columns = list(rows[0].keys())
    n_col = _pick_column(columns, params_column, PARAM_COLUMNS, "parameters", True)
    d_col = _pick_column(columns, tokens_column, TOKEN_COLUMNS, "tokens", False)
    l_col = _pick_column(columns, loss_column, LOSS_COLUMNS, "loss", True)
    r_col = _pick_column(columns, recipe_column, RECIPE_COLUMNS, "recipe", False)
    swept = default_hyperparameters(rows)
    conditions = [] if hyperparameters is None else [k for k in swept if k not in hyperparameters]

    def recipe_of(row: Mapping[str, Any]) -> str:
        name = ("" if row[r_col] is None else str(row[r_col])) if r_col else "all"
        axes = axis_values(row)
        return ", ".join([name] + [f"{k}={axes.get(k)}" for k in conditions])

    names = [n_col, l_col] + ([d_col] if d_col else [])
    notes: dict[str, list[str]] = {}
    unfinished: dict[str, dict[str, int]] = {}
    bad: dict[str, int] = {}
    valid = []
    for row in rows:
        recipe = recipe_of(row)
        notes.setdefault(recipe, [])
        status = str(row.get(STATUS, COMPLETED) or "")
        if status != COMPLETED:
            counts = unfinished.setdefault(recipe, {})
            counts[status or "(empty)"] = counts.get(status or "(empty)", 0) + 1
            continue
        values = [_number(row.get(c)) for c in names]
        if not all(math.isfinite(v) and v > 0 for v in values):
            bad[recipe] = bad.get(recipe, 0) + 1
            continue
        valid.append({**row, **dict(zip(names, values))})
    for recipe, counts in unfinished.items():
        notes[recipe].append("skipped unfinished runs: " + ", ".join(
            f"{k} {status}" for status, k in sorted(counts.items())))
    for recipe, count in bad.items():
        notes[recipe].append(f"{count} row(s) skipped: missing, non-numeric or non-positive "
                             f"{', '.join(names)}")
    selection = select_envelope(valid, n_column=n_col, loss_column=l_col, d_column=d_col,
                                recipe_of=recipe_of, hyperparameters=hyperparameters,
                                select_by=select_by)
    used = {"N": n_col, "L": l_col, **({"D": d_col} if d_col else {}),
            **({"recipe": r_col} if r_col else {})}
    return PreparedTable(selection, used, recipe_of, notes)


def fit_table(table: Union[str, Path, Sequence[Mapping[str, Any]]], *,
              params_column: Optional[str] = None, tokens_column: Optional[str] = None,
              loss_column: Optional[str] = None, recipe_column: Optional[str] = None,
              hyperparameters: Optional[Sequence[str]] = None, select_by: str = "seed",
              holdout: int = DEFAULT_HOLDOUT,
              n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95,
              chinchilla: bool = True, huber_delta: float = 1e-3,
              grid: Grid = EPOCH_GRID) -> dict[str, RecipeFits]:
    """Fit a results table per recipe (what `bitnet fit TABLE.csv` prints).

    `table` is a CSV path or a list of row dicts. Columns default to the first present of
    PARAM_COLUMNS (N), TOKEN_COLUMNS (D, optional) and LOSS_COLUMNS (L); rows are grouped by
    `recipe_column` (default: the first of RECIPE_COLUMNS present; else one group, "all"). Rows
    whose `status` column is present and not "completed", or with a missing or non-positive
    value, are skipped (noted). Over `hyperparameters` (default: the swept keys that are not size,
    tokens, precision or seed, from the `axes` column) the best run per (N, D, seed) is kept (per
    (N, D) by the mean over the seeds with `select_by="mean"`, every seed at the winner);
    swept keys left out of an explicit list split the recipe instead ("b1.58, key=value").
    Every law of `LAWS` is fitted to the mean loss per size with `n_boot` bootstrap refits (0:
    none; from the seed spread where sizes have several seeds) and, with `holdout` = K > 0,
    refitted without the K largest sizes to predict them. A fit that cannot be made is a note.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ConfigError(f"bootstrap resamples must be 0 (no bootstrap) or a positive "
                          f"integer, got {n_boot!r}")
    check_holdout(holdout)
    prepared = prepare_table(table, params_column=params_column, tokens_column=tokens_column,
                             loss_column=loss_column, recipe_column=recipe_column,
                             hyperparameters=hyperparameters, select_by=select_by)
    selection, used, recipe_of, notes = (prepared.selection, prepared.used, prepared.recipe_of,
                                         prepared.notes)
    n_col, l_col, d_col = used["N"], used["L"], used.get("D")
    options = {"chinchilla": chinchilla, "huber_delta": huber_delta, "grid": grid}

    def boot_from(stream: int) -> Callable[[Fit, Replicates, TableLaw], Fit]:
        def boot(fit: Fit, reps: Replicates, law: TableLaw) -> Fit:
            if not n_boot:
                return fit
            resample = reps.resampler(len(law.variables)) if reps.has_replicates else None
            return bootstrap_fit(fit, n_boot=n_boot, seed=stream, level=level, resample=resample)
        return boot

    results = {}
    # Each recipe draws its bootstrap from its own stream (seed + its index): the recipes' seed
    # noise is independent, and `compare` pairs their samples by index for loss ratios. With one
    # stream for all, every recipe's k-th draw moved the same way and the ratio bands collapsed.
    for index, recipe in enumerate(notes):
        stream = seed + index
        boot = boot_from(stream)
        members = [r for r in selection.rows if recipe_of(r) == recipe]
        recipe_notes = list(notes[recipe])
        x = [np.array([r[c] for r in members], dtype=float)
             for c in [n_col] + ([d_col] if d_col else [])]
        loss = np.array([r[l_col] for r in members], dtype=float)
        reps = Replicates.from_points(x, loss)
        if d_col and len(np.unique(x[1])) > 1:
            recipe_notes.append(f"{len(np.unique(x[1]))} distinct token counts: the L(N) fits "
                                "mix data sizes")
        chosen = tuple(c for c in selection.choices if c.recipe == recipe)
        selection_warnings = [w for c in chosen if (w := c.warning())]
        laws = {}
        for law in LAWS.values():
            reason = law.requires(reps, options)
            if reason is not None:
                if reason:
                    recipe_notes.append(f"{law.label} not fitted: {reason}")
                continue
            try:
                fit = _fit_law(law, reps, options, boot)
            except ConfigError as error:
                recipe_notes.append(f"{law.label} not fitted: {error}")
                continue
            held, holdout_warnings = _holdout(law, reps, int(holdout), options, boot, level,
                                              stream)
            laws[law.name] = LawFit(law.name, fit, held, tuple(
                list(fit.warnings) + selection_warnings + holdout_warnings),
                law_checks(fit, held, reps))
        results[recipe] = RecipeFits(recipe, len(loss), used, laws, reps, chosen,
                                     tuple(recipe_notes), tuple(members))
    return results


# ----------------------------------------------------------------------------------------------
# Printing and data.

def _law_lines(law: LawFit) -> list[str]:
    lines = [law.fit.summary()]
    lines += [f"  warning: {w}" for w in law.warnings if w not in law.fit.warnings]
    for h in law.holdout:
        band = f" [{h.low:.4g}, {h.high:.4g}]" if h.low is not None else ""
        where = f"N = {h.N:.4g}" + (f", D = {h.D:.4g}" if h.D is not None else "")
        verdict = "" if h.inside is None else (" inside its band" if h.inside
                                               else " OUTSIDE its band")
        lines.append(f"  held out {where}: predicted {h.predicted:.4g}{band} from the other "
                     f"sizes, observed {h.observed:.4g} ({100 * h.rel_error:+.2f}%){verdict}")
    if law.checks:
        failed = [f"{CHECKS[c.name]}: {'no' if c.passed is False else 'not checked'} "
                  f"({c.detail})" for c in law.checks if c.passed is not True]
        lines.append("  checks: all passed" if not failed else
                     "  checks not passed: " + "; ".join(failed))
    return lines


def _size_lines(group: RecipeFits) -> list[str]:
    reps = group.replicates
    if reps is None or not reps.has_replicates:
        return []
    spread = ", ".join(f"N = {n:.4g}: {m:.4g} +- {s:.2g} ({k} seeds)" for n, m, s, k in
                       zip(reps.x[0], reps.means, reps.spread, reps.counts))
    return [f"  seed-to-seed spread (mean +- sd): {spread}"]


def _choice_lines(group: RecipeFits) -> list[str]:
    if not group.choices:
        return []
    lines = [f"  best {', '.join(group.choices[0].keys)} per size:"]
    for c in group.choices:
        where = f"N = {c.N:.4g}" + (f", D = {c.D:.4g}" if c.D is not None else "") \
            + (f", seed {c.seed}" if c.seed is not None else "")
        won = ", ".join(f"{k} = {v}" for k, v in c.winner_dict.items())
        lines.append(f"    {where}: {won} (loss {c.loss:.4g}, {len(c.tried)} tried"
                     + (", at the edge of its grid" if c.edges else "") + ")")
    return lines


def require_a_fit(fits: Mapping[str, RecipeFits], source: str) -> None:
    """Refuse a table from which no law could be fitted (too few rows, no finite losses, ...),
    naming why for each recipe: fitting nothing is an error, not an empty success."""
    if any(group.fits for group in fits.values()):
        return
    why = "; ".join(f"{recipe}: {group.notes[-1] if group.notes else 'no rows'}"
                    for recipe, group in fits.items())
    raise ConfigError(f"{source}: no law could be fitted ({why}); check the table's rows and "
                      f"columns")


def format_fits(fits: Mapping[str, RecipeFits], *, reference: str = "bf16") -> str:
    """Printable summary of `fit_table`'s result; when `reference` is among the recipes, each
    other recipe's L(N) is compared with it (loss ratio and effective parameter multiplier at the
    smallest and largest N of the runs)."""
    blocks = []
    for recipe, group in fits.items():
        lines = [f"== {recipe}: {group.n_points} runs ("
                 + ", ".join(f"{k} = {v}" for k, v in group.columns.items()) + ")"]
        lines += _choice_lines(group) + _size_lines(group)
        for law in group.laws.values():
            lines += _law_lines(law)
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


def fits_json(fits: Mapping[str, RecipeFits]) -> dict[str, Any]:
    """The fits as one JSON object (fits.json, `bitnet fit --json`): recipes -> recipe -> laws ->
    law name -> params, interval (name -> [low, high]), r2, points, warnings, holdout (N, D,
    observed, predicted, low, high, rel_error), checks (name -> passed, detail); NaN becomes
    null."""
    return {"recipes": {recipe: {"laws": {name: law.to_json()
                                          for name, law in group.laws.items()}}
                        for recipe, group in fits.items()}}
