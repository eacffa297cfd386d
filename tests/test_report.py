"""Reports and the notebook draw from the plain results table."""

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax.scaling import report
from bitnet_jax.scaling.results import RESULT_COLUMNS, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
SIZES = [5e4, 1e5, 2e5, 4e5, 8e5, 1.6e6]
LAWS = {"bf16": (1.5, 40.0, 0.35), "b1.58": (1.6, 45.0, 0.33)}  # E, A, alpha


def synthetic_rows(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for recipe, (e, a, alpha) in LAWS.items():
        for n in SIZES:
            loss = (e + a * n ** -alpha) * np.exp(rng.normal(0, 0.002))
            row = {c: None for c in RESULT_COLUMNS}
            row.update(run=f"{recipe}-{int(n)}", status="completed", precision=recipe,
                       params_non_embedding=int(n), tokens=1_000_000, final_eval_loss=loss,
                       flops_causal=6 * n * 1e6,
                       weight_memory_bytes=n * (0.25 if recipe == "b1.58" else 2.0),
                       energy_per_token_7nm_j=n * (1e-14 if recipe == "b1.58" else 5e-13))
            rows.append(row)
    rows.append({**rows[0], "run": "broken", "status": "diverged", "final_eval_loss": None})
    return rows


def test_fits_recover_the_laws_and_skip_failed_runs():
    fits, problems = report.fit_recipes(synthetic_rows(), n_boot=100)
    assert not problems and set(fits) == {"bf16", "b1.58"}
    for recipe, (e, a, alpha) in LAWS.items():
        fit = fits[recipe]
        assert fit.n_points == len(SIZES)
        assert fit.params["alpha"] == pytest.approx(alpha, rel=0.15)
        lo, hi = fit.intervals["E"]
        assert lo <= fit.params["E"] <= hi


def test_too_few_runs_are_reported_not_fitted():
    rows = [r for r in synthetic_rows() if r["params_non_embedding"] <= 1e5]
    fits, problems = report.fit_recipes(rows, n_boot=50)
    assert not fits and set(problems) == {"bf16", "b1.58"}
    assert all("point" in p for p in problems.values())


def test_plots_are_written(tmp_path):
    rows = synthetic_rows()
    fits, _ = report.fit_recipes(rows, n_boot=50)
    for column in ("params_non_embedding", "weight_memory_bytes", "energy_per_token_7nm_j"):
        path = report.plot_loss_against(rows, column, tmp_path / f"{column}.png", column, fits)
        assert path.stat().st_size > 10_000
    assert report.plot_comparison(fits, tmp_path / "cmp.png").stat().st_size > 10_000
    lines = report._comparison_lines(fits)
    assert len(lines) == 2 and "b1.58" in lines[0]


def test_table_round_trip(tmp_path):
    rows = synthetic_rows()
    write_table(rows, tmp_path / "results.csv")
    back = read_table(tmp_path / "results.csv")
    assert back[0]["params_non_embedding"] == rows[0]["params_non_embedding"]
    assert back[0]["final_eval_loss"] == pytest.approx(rows[0]["final_eval_loss"])
    assert back[-1]["final_eval_loss"] is None


NOTEBOOK = ROOT / "experiments" / "notebooks" / "scaling_curves.ipynb"


def test_notebook_runs_in_a_jupyter_kernel_on_a_results_table_and_fits_json(tmp_path,
                                                                             monkeypatch):
    """The notebook as researchers run it: a real kernel (nbclient + ipykernel), top to bottom,
    plotting inline from results.csv and fits.json (held-out predictions included)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from bitnet_jax.scaling.downstream import downstream_fits
    from bitnet_jax.scaling.fit import fit_table, fits_json

    rows = []  # two learning rates per size: the smaller wins everywhere (not bracketed)
    for row in synthetic_rows():
        for lr, worse in ((1e-3, 1.0), (2e-3, 1.01)):
            loss = row["final_eval_loss"] and row["final_eval_loss"] * worse
            rows.append({**row, "run": f"{row['run']}-{lr}", "lr": lr, "final_eval_loss": loss,
                         "axes": json.dumps({"optimizer.lr": lr})})
    for row in rows:  # an lm-eval score that rises as the loss falls
        row["eval/tiny/acc"] = row["final_eval_loss"] and 2.5 - row["final_eval_loss"]
    write_table(rows, tmp_path / "results.csv")
    fits = {**fits_json(fit_table(rows, n_boot=50)), "downstream": downstream_fits(rows, 50)}
    (tmp_path / "fits.json").write_text(json.dumps(fits))
    monkeypatch.setenv("BITNET_RESULTS", str(tmp_path / "results.csv"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "recipes fitted: ['b1.58', 'bf16']" in text  # the laws of fits.json, both recipes
    for needle in ("[bf16] L(N): E = ", "[b1.58] L(N)-pure", "predicted"):
        assert needle in text, needle
    assert "optimum not bracketed" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # loss against N with the held-out predictions, against the LR,
    # against memory and energy; the downstream score against loss and N
    assert not list(tmp_path.glob("**/*.png"))  # inline only, nothing written


def test_the_committed_notebook_has_no_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_isoflop_summary_where_budgets_repeat():
    rng = np.random.default_rng(1)
    rows = []
    for budget in (1e13, 1e14, 1e15):
        for n in np.geomspace(1e5, 1e7, 5):
            tokens = budget / (6 * n)
            loss = 1.7 + 400 * n ** -0.34 + 400 * tokens ** -0.28 + rng.normal(0, 1e-3)
            row = {c: None for c in RESULT_COLUMNS}
            row.update(run=f"{budget}-{n}", status="completed", precision="bf16",
                       params_non_embedding=int(n), tokens=tokens, flops_causal=budget,
                       final_eval_loss=loss)
            rows.append(row)
    summaries = report.fit_isoflop_recipes(rows)
    assert summaries["bf16"].startswith("N*(C) = k * C^a") and "(3 budgets)" in summaries["bf16"]
    assert not report.fit_isoflop_recipes(synthetic_rows())  # one budget per size: skipped
    # Three seeds of one size share a budget but make no parabola: skipped, not "not fitted".
    seeds = [dict(row, run=f"{row['run']}-{seed}") for row in synthetic_rows() for seed in range(3)]
    assert not report.fit_isoflop_recipes(seeds)


def law_table_rows(seed=3):
    """Two recipes, 4 sizes x 3 token counts each (so L(N, D) is fitted too), as a sweep writes."""
    rng = np.random.default_rng(seed)
    rows = []
    for recipe, scale in (("bf16", 1.0), ("b1.58", 1.05)):
        for n in np.geomspace(1e5, 3e6, 4):
            for d in (1e7, 4e7, 1.6e8):
                loss = scale * (1.7 + 400 * n ** -0.34 + 400 * d ** -0.28) \
                    * np.exp(rng.normal(0, 0.002))
                row = {c: None for c in RESULT_COLUMNS}
                row.update(run=f"{recipe}-{n:.0f}-{d:.0f}", status="completed", precision=recipe,
                           params_non_embedding=int(n), tokens=int(d), final_eval_loss=loss)
                rows.append(row)
    return rows


def test_bitnet_fit_and_the_report_give_the_same_laws(tmp_path, monkeypatch, capsys):
    from bitnet_jax.cli import main
    from bitnet_jax.scaling import fit as fitter
    from bitnet_jax.scaling.laws import Grid, fit_chinchilla

    path = tmp_path / "results.csv"
    write_table(law_table_rows(), path)
    # Epoch's 4500-start grid takes ~15 s a fit and 1000 bootstraps ~10 s a table: both commands
    # get a small grid through the one fitter they share, and 50 resamples each.
    small = Grid(alpha=(0.2, 0.5), beta=(0.2, 0.5), e=(0.0, 0.5), a=(5.0, 10.0), b=(5.0, 10.0))
    monkeypatch.setattr(fitter, "fit_chinchilla", lambda *a, **k: fit_chinchilla(
        *a, **{**k, "grid": small}))
    printed_fits = []  # what `bitnet fit` fitted, caught on its way to the printer
    format_fits = fitter.format_fits
    monkeypatch.setattr(fitter, "format_fits", lambda fits, **k: printed_fits.append(fits)
                        or format_fits(fits, **k))
    assert main(["fit", str(path), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    laws = report.fit_laws(read_table(path), n_boot=50)  # what `bitnet sweep report` fits
    assert list(laws) == ["bf16", "b1.58"]
    assert printed.strip() == format_fits(laws).strip()
    (cli_laws,) = printed_fits
    for recipe, group in laws.items():
        assert set(group.fits) == {"offset", "power", "chinchilla"}
        for kind, fit in group.fits.items():
            again = cli_laws[recipe].fits[kind]
            assert fit.params == again.params and fit.intervals == again.intervals, (recipe, kind)
            assert np.array_equal(fit.samples, again.samples)
        for name, law in group.laws.items():  # the same held-out predictions and warnings
            assert law.holdout == cli_laws[recipe].laws[name].holdout and law.holdout
            assert law.warnings == cli_laws[recipe].laws[name].warnings


def test_bitnet_fit_and_the_report_share_the_bootstrap_default():
    import inspect

    from bitnet_jax.cli import build_parser
    from bitnet_jax.scaling.bootstrap import DEFAULT_N_BOOT
    from bitnet_jax.scaling.fit import fit_table

    def default(fn):
        return inspect.signature(fn).parameters["n_boot"].default

    from bitnet_jax.scaling.precision_fit import PRECISION_N_BOOT, fit_precision_table
    from bitnet_jax.scaling.precision_report import precision_section

    assert default(fit_table) == default(report.fit_laws) == DEFAULT_N_BOOT == 1000
    assert default(fit_precision_table) == PRECISION_N_BOOT == 200
    # Neither `bitnet fit` nor the report names a count unless asked: each fitter's own default
    assert default(report.write_report) is default(report.write_report_files) is None
    assert default(precision_section) is None
    for command in (["fit", "results.csv"], ["sweep", "report", "s.yaml"]):
        assert build_parser().parse_args(command).bootstrap is None
