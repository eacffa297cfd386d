"""The one fitter of a results table: `bitnet fit TABLE.csv` and `bitnet sweep report` both call
`fit_table`, with the same defaults, so they print the same laws for the same table.

Per recipe: L(N) = E + A N^-alpha, L(N) = A N^-alpha and, where the token count varies, L(N, D),
each with bootstrap intervals; `format_fits` prints them and compares each recipe with bf16.
numpy and scipy only, like `laws`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.bootstrap import DEFAULT_N_BOOT, bootstrap_fit
from bitnet_jax.scaling.compare import effective_parameter_multiplier, loss_ratio
from bitnet_jax.scaling.laws import (EPOCH_GRID, Fit, Grid, fit_chinchilla, fit_power_law,
                                     fit_power_law_with_offset)
from bitnet_jax.scaling.results import (COMPLETED, LOSS_COLUMNS, PARAM_COLUMNS, RECIPE_COLUMNS,
                                        STATUS, TOKEN_COLUMNS, read_table)

__all__ = ["RecipeFits", "fit_table", "format_fits"]


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
        recipe = ("" if row[r_col] is None else str(row[r_col])) if r_col else "all"
        status = str(row.get(STATUS, COMPLETED) or "")
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
