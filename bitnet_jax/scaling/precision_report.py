"""The "Precision as a scaling axis" section of a sweep report.

Written when a results table holds at least two bit settings (its `weight_bits`, `act_bits` and
`kv_bits` columns): Kumar et al.'s precision law fitted across recipes, the QAT gap per bit
setting, the models compared by held-out error, the loss against the QAT split
(`train.qat_start_fraction`) per size with the best marked, and the compute-optimal precision
per budget under training compute, weight memory and inference energy, as tables and plots.
`report.write_report_files` calls `precision_section`; its JSON goes into fits.json as
"precision".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.precision_fit import (PRECISION_N_BOOT, PrecisionFits,
                                              fit_precision_table, precision_json)
from bitnet_jax.scaling.precision_laws import LOG2_3
from bitnet_jax.scaling.precision_optimal import (draw_optima, format_optima, mac_energy_pj,
                                                  optimal_precision)
from bitnet_jax.scaling.results import ACT_BITS, KV_BITS, WEIGHT_BITS

__all__ = ["QAT_SPLIT_KEY", "has_precision_axis", "precision_section"]

QAT_SPLIT_KEY = "train.qat_start_fraction"


def has_precision_axis(rows: list[dict]) -> bool:
    """Whether the table holds at least two bit settings among its finished runs."""
    settings = {tuple(r.get(c) for c in (WEIGHT_BITS, ACT_BITS, KV_BITS)) for r in rows
                if r.get("status", "completed") == "completed"}
    return len(settings - {(None, None, None)}) >= 2


def _law_rows(title: str, fits: dict) -> list[str]:
    lines = [f"| {title} | parameters (95% bootstrap interval) | R² | points |", "|---|---|---|---|"]
    for name, law in fits.items():
        fit = law.fit
        params = "; ".join(
            f"{k} = {v:.4g}" + (f" [{fit.intervals[k][0]:.3g}, {fit.intervals[k][1]:.3g}]"
                                if k in fit.intervals else "") for k, v in fit.params.items())
        lines.append(f"| {name} | {params} | {fit.r2:.4f} | {fit.n_points} |")
        lines += [f"| | warning: {w} | | |" for w in law.warnings]
    return lines


def _comparison_rows(result: PrecisionFits) -> list[str]:
    lines = ["| model | parameters | RMSE of log loss (fit) | held-out points "
             "| mean abs. rel. error | inside 95% band |", "|---|---|---|---|---|---|"]
    for s in result.comparison:
        err = "-" if s.mean_abs_rel_error is None else f"{100 * s.mean_abs_rel_error:.2f}%"
        inside = "-" if s.inside is None else f"{100 * s.inside:.0f}%"
        lines.append(f"| {s.model} | {s.n_params} | {s.rmse_log:.4g} | {s.held_out} | {err} "
                     f"| {inside} |")
    return lines


def _split_rows(laws: dict) -> list[str]:
    """The best QAT split per (recipe, N, D, seed), from the hyperparameter selection."""
    lines = []
    for recipe, group in laws.items():
        for c in group.choices:
            if QAT_SPLIT_KEY not in c.keys or len(c.grid(QAT_SPLIT_KEY)) < 2:
                continue
            i = c.keys.index(QAT_SPLIT_KEY)
            tried = ", ".join(f"{v[i]}: {loss:.4f}" for v, loss in
                              sorted(c.tried, key=lambda t: float(t[0][i] or 0)))
            lines.append(f"| {recipe} | {c.N:,.0f} | {c.D or 0:.3g} | {c.winner[i]} "
                         f"| {tried} |")
    if not lines:
        return []
    return ["| recipe | N | D | best split | loss per split |", "|---|---|---|---|---|"] + lines


def _budgets(result: PrecisionFits) -> tuple[np.ndarray, float]:
    """Compute budgets around those of the runs (6 N D, x1/10 to x1000) and the largest D."""
    n, d = result.points.reps.x[0], result.points.reps.x[1]
    c = 6 * n * d
    return np.geomspace(c.min() / 10, c.max() * 1000, 9), float(d.max())


def _resource_budgets(n: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight memory (bytes) and inference energy (J / token) budgets spanning the runs' sizes
    from ternary to 16 bits."""
    memory = np.geomspace(n.min() * LOG2_3 / 8, n.max() * 2, count)
    energy = np.geomspace(n.min() * mac_energy_pj(LOG2_3, 8), n.max() * mac_energy_pj(16, 16),
                          count) * 1e-12
    return memory, energy


def _plot_optima(law: dict, budgets: np.ndarray, tokens: float, n: np.ndarray,
                 path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    memory, energy = _resource_budgets(n, 9)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    draw_optima(axes[0], law, budgets, "compute")
    draw_optima(axes[1], law, memory, "memory", tokens=tokens)
    draw_optima(axes[2], law, energy, "energy", tokens=tokens)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def precision_section(rows: list[dict], laws: dict, out: Path, n_boot: Optional[int] = None
                      ) -> tuple[Optional[dict[str, Any]], list[str], dict[str, Path]]:
    """(fits.json's "precision" entry, the report lines, the plots) of a table, or (None, [],
    {}) when it has one bit setting only."""
    if not has_precision_axis(rows):
        return None, [], {}
    lines = ["## Precision as a scaling axis", ""]
    try:
        result = fit_precision_table(
            rows, law="precision", n_boot=PRECISION_N_BOOT if n_boot is None else n_boot)
    except ConfigError as error:
        return None, lines + [f"Not fitted: {error}", ""], {}
    precision = result.laws.get("precision", {})
    lines += ["Kumar et al.'s law across every recipe, L = A N_eff^-alpha + B D^-beta + E with "
              "N_eff = N prod (1 - exp(-P / gamma)) over the quantized weights (w), activations "
              "(a) and KV cache (kv); ternary counts as log2(3) bits, 16 bits as unquantized:", ""]
    lines += _law_rows("law", precision) if precision else ["(not fitted: see the notes)"]
    gaps = result.laws.get("qat-gap", {})
    if gaps:
        lines += ["", "Chen et al.'s QAT gap over the 16-bit Chinchilla law, per bit setting "
                  "(G: the inputs sharing one weight scale; per-channel and per-tensor scales "
                  "count as G = d_model):", ""] + _law_rows("setting", gaps)
    if result.comparison:
        lines += ["", "The models by their error on the largest size(s), refitted without them "
                  "(Chinchilla without precision < Kumar's N_eff < a free N_eff multiplier per "
                  "recipe are nested; the QAT gap has one law per setting):", ""]
        lines += _comparison_rows(result)
    lines += ["", "Notes: " + "; ".join(result.notes)] if result.notes else []
    split = _split_rows(laws)
    if split:
        lines += ["", f"When to quantize: the loss against `{QAT_SPLIT_KEY}` (the share of "
                  "steps trained in bf16 before switching to the recipe) per size, best split "
                  "first in the plot `loss against train.qat_start_fraction per size`:", ""]
        lines += split
    plots = {}
    if precision:
        params = precision["all"].fit.params
        budgets, tokens = _budgets(result)
        memory, energy = _resource_budgets(result.points.reps.x[0], 3)
        optima = (optimal_precision(params, budgets[::2], "compute")
                  + optimal_precision(params, memory, "memory", tokens=tokens)
                  + optimal_precision(params, energy, "energy", tokens=tokens))
        lines += ["", "Compute-optimal precision under the fitted law (weights, activations "
                  "and, where fitted, the KV cache at P bits; training cost 6 N D P / 16 as "
                  "Kumar et al.; weight memory N P / 8 bytes and inference energy N x the "
                  f"energy of one multiply-accumulate (7nm) at D = {tokens:.3g} tokens). "
                  "Extrapolated far beyond the runs, these are the law's predictions, not "
                  "measurements:", ""] + format_optima(optima)
        if precision["all"].warnings:
            lines += ["", "**The precision law above carries warnings: these optima inherit "
                      "them.**"]
        plots["compute-optimal precision"] = _plot_optima(
            params, budgets, tokens, result.points.reps.x[0], out / "optimal_precision.png")
    return precision_json(result), lines + [""], plots
