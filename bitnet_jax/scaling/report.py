"""Sweep reports: the results table -> scaling-law fits -> fits.json and report.md with plots.

`write_report(sweep)` collects the table and fits it with `fit.fit_table`, the function and
defaults of `bitnet fit` (the best run per size over swept hyperparameters; per recipe L(N) =
E + A N^-alpha and the pure power law, L(N, D) where the token count varies, all with bootstrap
intervals and predictions of the largest size from the others), writes them as fits.json, shows
the hyperparameter selection, the seed-to-seed noise and each recipe's gap to bf16 against it,
adds isoflop curves where budgets repeat, compares every recipe with bf16 (loss ratio, effective
parameter multiplier, loss against weight memory and against inference energy), adds the
precision laws where the table holds several bit settings (`precision_report`) and the lm-eval
scores against loss and N where the sweep scored its runs (`downstream`), and draws the plots.
The `draw_*` functions draw on any matplotlib axes, so a notebook draws the same curves inline
from `results.csv` and `fits.json`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.run_files import METRICS_FILE
from bitnet_jax.scaling.bootstrap import DEFAULT_N_BOOT
from bitnet_jax.scaling.compare import (effective_parameter_multiplier_band, loss_ratio_band,
                                        loss_vs_resource)
from bitnet_jax.scaling.downstream import DOWNSTREAM_N_BOOT, downstream_fits
from bitnet_jax.scaling.fit import RecipeFits, fit_table, fits_json
from bitnet_jax.scaling.holdout import DEFAULT_HOLDOUT
from bitnet_jax.scaling.isoflop import fit_isoflop
from bitnet_jax.scaling.precision_report import precision_section
from bitnet_jax.scaling.results import COMPLETED, LOSS, PARAMS, RECIPE, STATUS
from bitnet_jax.scaling.trust import checks_table

REFERENCE = "bf16"
COLORS = {"bf16": "#1f77b4", "b1.58": "#d62728", "b1": "#9467bd", "a4.8": "#2ca02c",
          "v2-a8": "#ff7f0e", "v2-a4": "#8c564b"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def color(recipe: str) -> str:
    return COLORS.get(recipe, "#7f7f7f")


def completed(rows: list[dict], loss: str = LOSS) -> list[dict]:
    return [r for r in rows if r.get(STATUS) == COMPLETED
            and isinstance(r.get(loss), (int, float)) and math.isfinite(r[loss])]


def by_recipe(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[row[RECIPE]].append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != REFERENCE, kv[0])))


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows])


# ----------------------------------------------------------------------------------------------
# Fits.

def fit_laws(rows: list[dict], n_boot: int = DEFAULT_N_BOOT) -> dict[str, RecipeFits]:
    """The laws of `bitnet fit` for these rows: the same function with the same defaults (so the
    report and `bitnet fit results.csv` print the same parameters), the reference recipe first."""
    fits = fit_table(rows, n_boot=n_boot)
    return dict(sorted(fits.items(), key=lambda kv: (kv[0] != REFERENCE, kv[0])))


def laws_of_kind(laws: dict[str, RecipeFits], kind: str = "offset") -> tuple[dict, dict]:
    """One kind of law per recipe ("offset", "power" or "chinchilla"; see `RecipeFits.fits`) and,
    for the recipes without one, the fitter's notes joined as text."""
    fits = {recipe: group.fits[kind] for recipe, group in laws.items() if kind in group.fits}
    problems = {recipe: "; ".join(group.notes) for recipe, group in laws.items()
                if kind not in group.fits}
    return fits, problems


def fit_recipes(rows: list[dict], n_boot: int = DEFAULT_N_BOOT) -> tuple[dict, dict]:
    """Per recipe: L(N) = E + A N^-alpha with bootstrap intervals; why a recipe was not fitted."""
    return laws_of_kind(fit_laws(rows, n_boot), "offset")


def fit_isoflop_recipes(rows: list[dict], loss: str = LOSS) -> dict[str, str]:
    """Isoflop analysis per recipe where >= 2 compute budgets each have >= 3 model sizes
    (budgets grouped in bins of 0.1 decade); the printable summary, or why it was skipped."""
    out = {}
    for recipe, group in by_recipe(completed(rows, loss)).items():
        sizes, flops = _column(group, PARAMS), _column(group, "flops_causal")
        budgets = np.round(np.log10(flops) / 0.1)
        # Distinct sizes per budget: seeds of one size share a budget but make no parabola.
        if sum(len(set(sizes[budgets == b])) >= 3 for b in set(budgets)) < 2:
            continue
        try:
            out[recipe] = fit_isoflop(sizes, flops, _column(group, loss),
                                      log_bin_width=0.1).summary()
        except ConfigError as error:
            out[recipe] = f"not fitted: {error}"
    return out


# ----------------------------------------------------------------------------------------------
# Plots (plain rows in, a PNG out).

def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty plot (no runs yet) gets no legend
        ax.legend()


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grid(values: np.ndarray, n: int = 100) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.geomspace(lo / 1.5, hi * 1.5, n) if hi > lo else np.array([lo])


def plot_loss_against(rows: list[dict], x: str, path: Path, xlabel: str,
                      fits: Optional[dict] = None, loss: str = LOSS,
                      holdout: Optional[dict] = None) -> Path:
    """Loss against any column (log x), one colour per recipe, with fits and 95% bands (see
    `draw_loss_against`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    draw_loss_against(ax, rows, x, xlabel, fits, loss, holdout)
    return _save(plt, fig, path)


def draw_loss_against(ax, rows: list[dict], x: str, xlabel: str, fits: Optional[dict] = None,
                      loss: str = LOSS, holdout: Optional[dict] = None) -> None:
    """Draw loss against any column on `ax` (a notebook's inline figure or a report's file):
    the runs, each recipe's fit (a `Fit`, with its bootstrap band) and, from `holdout` (recipe ->
    fits.json holdout entries), each held-out size's prediction with its 95% band."""
    done = completed(rows, loss)
    if done:  # the runs set the scale; a wide bootstrap band must not flatten them
        observed = _column(done, loss)
        span = max(float(np.ptp(observed)), 0.02 * float(observed.max()))
        ax.set_ylim(observed.min() - 0.3 * span, observed.max() + 0.3 * span)
    for recipe, group in by_recipe(done).items():
        xs, ys = _column(group, x), _column(group, loss)
        ax.scatter(xs, ys, color=color(recipe), label=recipe, zorder=3)
        fit = (fits or {}).get(recipe)
        if fit is not None:
            grid = _grid(xs)
            ax.plot(grid, fit.predict(grid), color=color(recipe), lw=1.5)
            if fit.samples is not None:
                lo, hi = fit.prediction_interval(grid)
                ax.fill_between(grid, lo, hi, color=color(recipe), alpha=0.15, lw=0)
    for recipe, held in (holdout or {}).items():
        for i, h in enumerate(held):
            low = h["predicted"] if h["low"] is None else h["low"]
            high = h["predicted"] if h["high"] is None else h["high"]
            ax.errorbar([h["N"]], [h["predicted"]], fmt="D", mfc="none", ms=7, capsize=4,
                        yerr=[[max(h["predicted"] - low, 0.0)],
                              [max(high - h["predicted"], 0.0)]],
                        color=color(recipe), zorder=4,
                        label=f"{recipe}: predicted from smaller sizes" if i == 0 else None)
    _style(ax, xlabel, "validation loss (nats / token)")


def plot_training_curves(rows: list[dict], run_dirs: dict[str, Path], path: Path) -> Path:
    """Training loss against tokens for every run (recipe = colour, size = line width)."""
    from bitnet_jax.train.metrics import read_jsonl

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sizes = sorted({r[PARAMS] for r in rows})
    seen = set()
    for row in rows:
        run_dir = run_dirs.get(row["run"])  # rows of a table alone have no run directories
        metrics_path = run_dir / METRICS_FILE if run_dir is not None else None
        if metrics_path is None or not metrics_path.exists():
            continue
        train = [r for r in read_jsonl(metrics_path) if r.get("kind") == "train"]
        if not train:
            continue
        recipe = row[RECIPE]
        width = 0.6 + 2.0 * sizes.index(row[PARAMS]) / max(len(sizes) - 1, 1)
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color(recipe),
                lw=width, alpha=0.8, label=recipe if recipe not in seen else None)
        seen.add(recipe)
    ax.set_title("training curves (wider = larger model)")
    _style(ax, "training tokens", "training loss (nats / token)")
    return _save(plt, fig, path)


def plot_comparison(fits: dict, path: Path) -> Optional[Path]:
    """Loss ratio and effective parameter multiplier of each recipe against bf16, with bands."""
    reference = fits.get(REFERENCE)
    others = {k: v for k, v in fits.items() if k != REFERENCE}
    if reference is None or not others:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for recipe, fit in others.items():
        n = _grid(np.concatenate([fit.data[0], reference.data[0]]))
        ratio = loss_ratio_band(fit, reference, n)
        left.plot(n, ratio.value, color=color(recipe), label=f"{recipe} / {REFERENCE}")
        left.fill_between(n, ratio.lo, ratio.hi, color=color(recipe), alpha=0.15, lw=0)
        mult = effective_parameter_multiplier_band(fit, reference, n)
        right.plot(n, mult.value, color=color(recipe), label=recipe)
        finite_hi = np.where(np.isfinite(mult.hi), mult.hi, np.nan)
        right.fill_between(n, mult.lo, finite_hi, color=color(recipe), alpha=0.15, lw=0)
    left.axhline(1.0, color="k", lw=0.8)
    right.axhline(1.0, color="k", lw=0.8)
    for ax, label in ((left, "loss ratio"), (right, f"{REFERENCE} size with the same loss / N")):
        _style(ax, "non-embedding parameters N", label)
    return _save(plt, fig, path)


def draw_downstream(loss_ax, size_ax, column: str, fits: dict) -> None:
    """One lm-eval score (a fits.json "downstream" entry) against loss, with each recipe's
    fitted line, and against N."""
    for recipe, fit in fits.items():
        points = fit["points"]
        loss = np.array([p["loss"] for p in points])
        score = np.array([p["score"] for p in points])
        loss_ax.scatter(loss, score, color=color(recipe), label=recipe, zorder=3)
        size_ax.scatter([p["N"] for p in points], score, color=color(recipe), label=recipe,
                        zorder=3)
        line = fit["against_loss"]
        if line is not None:
            grid = np.linspace(loss.min(), loss.max(), 20)
            loss_ax.plot(grid, line["intercept"] + line["slope"] * grid, color=color(recipe))
    _style(loss_ax, "validation loss (nats / token)", column)
    loss_ax.set_xscale("linear")
    _style(size_ax, "non-embedding parameters N", column)


def plot_downstream(downstream: dict, path: Path) -> Path:
    """Every score against loss (left) and against N (right), one row per score."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(downstream), 2, figsize=(10, 3.6 * len(downstream)),
                             squeeze=False)
    for (loss_ax, size_ax), (column, fits) in zip(axes, downstream.items()):
        draw_downstream(loss_ax, size_ax, column, fits)
    return _save(plt, fig, path)


def draw_hyperparameter(ax, choices, key: str, recipe: str) -> None:
    """Loss against one swept hyperparameter, a line per size (and seed) of one recipe; the
    winner of each marked, a winner at the edge of its grid ringed in red."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    sizes = sorted({c.N for c in choices})
    labelled: set[float] = set()
    for c in choices:
        i = c.keys.index(key)
        others = [j for j in range(len(c.keys)) if j != i]
        # one line through the winner's setting of the other hyperparameters
        line = sorted(((v[i], loss) for v, loss in c.tried
                       if all(v[j] == c.winner[j] for j in others)), key=lambda t: t[0])
        shade = cmap(sizes.index(c.N) / max(len(sizes) - 1, 1))
        label = None if c.N in labelled else f"N = {c.N:.3g}"
        labelled.add(c.N)
        ax.plot([v for v, _ in line], [loss for _, loss in line], "o-", color=shade, ms=3,
                lw=1, label=label)
        ax.plot([c.winner[i]], [c.loss], "*", color=shade, ms=12,
                mec="red" if key in c.edges else shade, mew=1.5)
    ax.set_title(recipe)
    values = [v[c.keys.index(key)] for c in choices for v, _ in c.tried]
    positive = all(isinstance(v, (int, float)) and v > 0 for v in values)
    _style(ax, key, "validation loss (nats / token)")
    if not positive:
        ax.set_xscale("linear")


def plot_hyperparameter(laws: dict[str, RecipeFits], key: str, path: Path) -> Optional[Path]:
    """`draw_hyperparameter` for every recipe that swept `key`, side by side."""
    panels = {recipe: group.choices for recipe, group in laws.items()
              if group.choices and key in group.choices[0].keys
              and len(group.choices[0].grid(key)) > 1}  # a recipe that swept it (a QAT split)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (recipe, choices) in zip(axes[0], panels.items()):
        draw_hyperparameter(ax, choices, key, recipe)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------------------------
# The report.

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _law_table(fits: dict) -> list[str]:
    lines = ["| recipe | law | parameters (95% bootstrap interval) | R² | points |",
             "|---|---|---|---|---|"]
    for recipe, fit in fits.items():
        params = "; ".join(
            f"{k} = {v:.4g}" + (f" [{fit.intervals[k][0]:.3g}, {fit.intervals[k][1]:.3g}]"
                                if k in fit.intervals else "")
            for k, v in fit.params.items())
        lines.append(f"| {recipe} | `{fit.form}` | {params} | {fit.r2:.4f} | {fit.n_points} |")
        lines += [f"| | warning | {w} | | |" for w in fit.warnings]
    return lines


def _runs_table(rows: list[dict]) -> list[str]:
    lines = ["| run | status | N (non-emb.) | tokens | val. loss | bits/byte | weight memory "
             "| energy/token (7nm) | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = r.get("weight_memory_bytes")
        energy = r.get("energy_per_token_7nm_j")
        lines.append(
            f"| {r['run']} | {r['status']} | {r['params_non_embedding']:,} | {_fmt(r['tokens'])} "
            f"| {_fmt(r.get(LOSS))} | {_fmt(r.get('eval_bpb'))} "
            f"| {_fmt(memory / 1e6 if memory else None)} MB | {_fmt(energy * 1e9 if energy else None)} nJ "
            f"| {_fmt(r.get('wall_seconds'), 3)} s |")
    return lines


def _downstream_lines(downstream: dict) -> list[str]:
    lines = ["| score | recipe | runs | range | slope in loss (95% bootstrap interval) "
             "| Spearman with N |", "|---|---|---|---|---|---|"]
    for column, fits in downstream.items():
        for recipe, fit in fits.items():
            scores = [p["score"] for p in fit["points"]]
            line = fit["against_loss"]
            slope = "-" if line is None else ("{:.3g} [{:.3g}, {:.3g}]".format(
                line["slope"], *line["slope_interval"]))
            lines.append(f"| `{column}` | {recipe} | {len(scores)} | {min(scores):.4g} to "
                         f"{max(scores):.4g} | {slope} | {_fmt(fit['spearman_with_N'], 3)} |")
    return lines


def _comparison_lines(fits: dict) -> list[str]:
    reference = fits.get(REFERENCE)
    if reference is None:
        return []
    lines = []
    for recipe, fit in fits.items():
        if recipe == REFERENCE:
            continue
        n = np.array([min(fit.data[0].min(), reference.data[0].min()),
                      max(fit.data[0].max(), reference.data[0].max())])
        ratio = loss_ratio_band(fit, reference, n)
        mult = effective_parameter_multiplier_band(fit, reference, n)
        for i, label in enumerate(("smallest", "largest")):
            lines.append(
                f"- {recipe} at N = {n[i]:,.0f} ({label} run size): loss {ratio.value[i]:.3f}x "
                f"{REFERENCE} [{ratio.lo[i]:.3f}, {ratio.hi[i]:.3f}]; matches a {REFERENCE} model "
                f"of {mult.value[i]:.3g}x its size [{mult.lo[i]:.3g}, {mult.hi[i]:.3g}]")
    return lines


def _range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite.min():.3g}-{finite.max():.3g}" if len(finite) else "(undefined)"


def _resource_lines(rows: list[dict], column: str, resource: str) -> list[str]:
    data = {recipe: (_column(group, column), _column(group, LOSS))
            for recipe, group in by_recipe(completed(rows)).items()}
    if REFERENCE not in data or len(data) < 2:
        return []
    try:
        comparison = loss_vs_resource(data, resource=resource, reference=REFERENCE)
    except ConfigError as error:
        return [f"- loss against {resource}: not fitted ({error})"]
    lines = []
    for recipe, wins in comparison.wins.items():
        lines.append(f"- {recipe} against {REFERENCE} at the same {resource}: lower loss on "
                     f"{100 * wins.mean():.0f}% of the shared range; {REFERENCE} needs "
                     f"{_range(comparison.multiplier[recipe])}x the {resource} for the same loss")
    return lines


def _where(n: float, d: Optional[float], seed=None) -> str:
    return f"{n:,.0f}" + (f" | {d:.3g}" if d is not None else " | -") \
        + (f" | {seed}" if seed is not None else " | -")


def _selection_lines(laws: dict[str, RecipeFits]) -> list[str]:
    lines = []
    for recipe, group in laws.items():
        if not group.choices:
            continue
        keys = group.choices[0].keys
        lines += ["", f"{recipe}:", "", "| N | D | seed | best " + ", ".join(keys)
                  + " | loss | tried | optimum bracketed |", "|---|---|---|---|---|---|---|"]
        for c in sorted(group.choices, key=lambda c: (c.N, c.D or 0, str(c.seed))):
            won = ", ".join(f"{v}" for v in c.winner)
            tried = "; ".join(", ".join(f"{v}" for v in values) + f": {loss:.4f}"
                              for values, loss in sorted(c.tried, key=lambda t: str(t[0])))
            edge = "no: " + ", ".join(c.edges) + " at the edge of its grid" if c.edges else "yes"
            lines.append(f"| {_where(c.N, c.D, c.seed)} | {won} | {c.loss:.4f} | {tried} "
                         f"| {edge} |")
    return lines


def _noise_lines(laws: dict[str, RecipeFits]) -> list[str]:
    from bitnet_jax.scaling.noise import gap_against_noise

    with_seeds = {recipe: group.replicates for recipe, group in laws.items()
                  if group.replicates is not None and group.replicates.has_replicates}
    if not with_seeds:
        return ["Every size has one seed: the seed-to-seed noise is not measured, so no gap "
                "below can be told apart from it (add a `seed` axis)."]
    lines = ["| recipe | N | D | seeds | mean loss | seed-to-seed sd |",
             "|---|---|---|---|---|---|"]
    for recipe, reps in with_seeds.items():
        for i in range(len(reps)):
            d = reps.x[1][i] if len(reps.x) > 1 else None
            lines.append(f"| {recipe} | {reps.x[0][i]:,.0f} | {_fmt(d, 3)} | {reps.counts[i]} "
                         f"| {reps.means[i]:.4f} | {_fmt(reps.spread[i], 2)} |")
    reference = laws.get(REFERENCE)
    if reference is None or reference.replicates is None:
        return lines
    for recipe, group in laws.items():
        if recipe == REFERENCE or group.replicates is None:
            continue
        gaps = gap_against_noise(group.replicates, reference.replicates)
        if not gaps:
            continue
        lines += ["", f"{recipe} - {REFERENCE} (mean loss gap; 95% interval of the difference "
                  "from the seeds, Welch):", "",
                  "| N | D | gap | 95% interval | exceeds the noise |", "|---|---|---|---|---|"]
        for g in gaps:
            band = "-" if g.low is None else f"[{g.low:+.4f}, {g.high:+.4f}]"
            verdict = {None: "not measured (one seed)", True: "yes", False: "no"}[g.exceeds]
            lines.append(f"| {g.N:,.0f} | {_fmt(g.D, 3)} | {g.gap:+.4f} | {band} | {verdict} |")
    return lines


def _holdout_lines(laws: dict[str, RecipeFits]) -> list[str]:
    lines = ["| recipe | law | held-out N | D | observed | predicted [95% band] | rel. error "
             "| inside the band |", "|---|---|---|---|---|---|---|---|"]
    missing = []
    for recipe, group in laws.items():
        for name, law in group.laws.items():
            for h in law.holdout:
                band = "" if h.low is None else f" [{h.low:.4f}, {h.high:.4f}]"
                inside = {None: "-", True: "yes", False: "**no**"}[h.inside]
                lines.append(f"| {recipe} | {name} | {h.N:,.0f} | {_fmt(h.D, 3)} "
                             f"| {h.observed:.4f} | {h.predicted:.4f}{band} "
                             f"| {100 * h.rel_error:+.2f}% | {inside} |")
            if not law.holdout:
                missing += [f"- {recipe} {name}: {w}" for w in law.warnings if "holdout" in w]
    return (lines if len(lines) > 2 else []) + ([""] + missing if missing else [])


def write_report(sweep, n_boot: Optional[int] = None) -> Path:
    """Collect, fit and plot a sweep; returns the path of report.md (fits.json beside it)."""
    from bitnet_jax.scaling.sweep import collect

    rows = collect(sweep)
    run_dirs = {run.run_id: run.run_dir for run in sweep.runs}
    return write_report_files(sweep.name, rows, sweep.directory, run_dirs, n_boot)


def write_report_files(name: str, rows: list[dict], out: Path, run_dirs: dict[str, Path],
                       n_boot: Optional[int] = None) -> Path:
    """Fit a results table, write fits.json, the plots and report.md into `out`. `n_boot`:
    bootstrap resamples of every law (default: each fitter's own, as `bitnet fit` uses)."""
    laws_n_boot = DEFAULT_N_BOOT if n_boot is None else n_boot
    laws = fit_laws(rows, laws_n_boot)
    precision, precision_lines, precision_plots = precision_section(rows, laws, out, n_boot)
    downstream = downstream_fits(rows)
    (out / "fits.json").write_text(json.dumps(
        {**fits_json(laws), **({"precision": precision} if precision else {}),
         **({"downstream": downstream} if downstream else {})}, indent=2) + "\n")
    fits, _ = laws_of_kind(laws, "offset")
    pure, _ = laws_of_kind(laws, "power")
    chinchilla, _ = laws_of_kind(laws, "chinchilla")
    envelope = [row for group in laws.values() for row in group.runs]
    holdout = {recipe: [h.to_json() for h in group.laws["L(N)"].holdout]
               for recipe, group in laws.items() if "L(N)" in group.laws}

    plots = {
        "loss against parameters": plot_loss_against(
            envelope, PARAMS, out / "loss_vs_params.png",
            "non-embedding parameters N", fits, holdout=holdout),
        "loss against training compute": plot_loss_against(
            envelope, "flops_causal", out / "loss_vs_flops.png",
            "training FLOPs (causal convention)"),
        "loss against weight memory": plot_loss_against(
            envelope, "weight_memory_bytes", out / "loss_vs_memory.png",
            "weight memory at the recipe's storage format (bytes)"),
        "loss against inference energy": plot_loss_against(
            envelope, "energy_per_token_7nm_j", out / "loss_vs_energy.png",
            "inference energy per token, 7nm model (J)"),
        "training curves": plot_training_curves(rows, run_dirs, out / "training_curves.png"),
    }
    comparison_plot = plot_comparison(fits, out / "comparison.png")
    if comparison_plot is not None:
        plots[f"recipes against {REFERENCE}"] = comparison_plot
    swept = next((g.choices[0].keys for g in laws.values() if g.choices), ())
    for key in swept:
        path = plot_hyperparameter(laws, key, out / f"loss_vs_{key.replace('.', '_')}.png")
        if path is not None:
            plots[f"loss against {key} per size"] = path

    done = completed(rows)
    failed = [r for r in rows if r["status"] != "completed"]
    lines = [f"# Sweep report: {name}", "",
             f"{len(done)} of {len(rows)} runs completed; results table: `results.csv` "
             f"(also `results.parquet`). Loss is the final validation loss in nats per token.", ""]
    if failed:
        lines += ["## Runs that did not complete", ""]
        lines += [f"- `{r['run']}`: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
                  for r in failed]
        lines.append("")
    if swept:
        lines += ["## Hyperparameter selection", "",
                  f"Swept: {', '.join(swept)}. The laws are fitted to the best run per size "
                  "(and seed) over them; a winner at the edge of its grid was not bracketed, and "
                  "a wider grid may lower its loss."] + _selection_lines(laws) + [""]
    lines += ["## Seeds and noise", ""] + _noise_lines(laws) + [""]
    lines += ["## Scaling laws", "", "The laws of `bitnet fit results.csv` (also in `fits.json`): "
              "L(N) = E + A N^-alpha per recipe, fitted on log-loss residuals to the mean loss "
              f"of each size, with {laws_n_boot} bootstrap resamples (of the sizes, or drawn from "
              "the seed-to-seed spread where sizes have several seeds):", ""]
    lines += _law_table(fits) if fits else ["(no recipe has enough completed runs to fit)"]
    if pure:
        lines += ["", "Pure power laws L(N) = A N^-alpha:", ""] + _law_table(pure)
    if chinchilla:
        lines += ["", "L(N, D) = E + A/N^alpha + B/D^beta (Huber loss on log-loss, L-BFGS from "
                  "Epoch AI's grid):", ""] + _law_table(chinchilla)
    notes = [f"- {recipe}: {note}" for recipe, group in laws.items() for note in group.notes]
    if notes:
        lines += ["", "Notes from the fitter:", ""] + notes
    held = _holdout_lines(laws)
    if held:
        lines += ["", "## Validation by extrapolation", "",
                  f"Each law refitted without the {DEFAULT_HOLDOUT} largest size(s) (by compute "
                  "where D varies) predicts them; the band covers the bootstrap of that fit "
                  "and the noise of one observation:", ""] + held
    checks = {recipe: {n: law.checks for n, law in group.laws.items()}
              for recipe, group in laws.items() if group.laws}
    if checks:
        lines += ["", "## Can these laws be used?", "", "Usable: every check made and passed "
                  "(`scaling/trust.py`; `checks` in `fits.json`):", ""] + checks_table(checks)
    isoflop = fit_isoflop_recipes(envelope)
    if isoflop:
        lines += ["", "Isoflop curves (a parabola of loss in log N per compute budget; "
                  "N*(C) = k C^a):", ""]
        for recipe, text in isoflop.items():
            lines += [f"{recipe}:", "```", text, "```"]
    comparison = _comparison_lines(fits)
    if comparison:
        lines += ["", f"## Recipes against {REFERENCE}", ""] + comparison
    resources = (_resource_lines(envelope, "weight_memory_bytes", "weight memory")
                 + _resource_lines(envelope, "energy_per_token_7nm_j", "inference energy"))
    if resources:
        lines += [""] + resources
    if precision_lines:
        lines += [""] + precision_lines
    plots.update(precision_plots)
    if downstream:
        lines += ["", "## Downstream scores", "", "lm-evaluation-harness scores of every "
                  "completed run (the sweep's `eval:` tasks; `eval/<task>/<metric>` columns of "
                  "`results.csv`, `downstream` in `fits.json`): a least-squares line of score "
                  f"in loss per recipe, its slope's interval from {DOWNSTREAM_N_BOOT} bootstrap "
                  "resamples of the runs, and the rank correlation of score with N. Scores "
                  "near a task's chance level say little about a model:", ""]
        lines += _downstream_lines(downstream)
        plots["downstream scores against loss and parameters"] = plot_downstream(
            downstream, out / "downstream.png")
    lines += ["", "## Plots", ""]
    for title, path in plots.items():
        lines += [f"### {title[0].upper() + title[1:]}", "", f"![{title}]({path.name})", ""]
    lines += ["## Runs", ""] + _runs_table(rows) + [""]
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines))
    return report_path
