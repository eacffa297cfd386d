"""Precision as a scaling axis: the bit columns, Kumar's and Chen's laws, their comparison,
compute-optimal precision and `bitnet fit --law`."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from bitnet_jax.core.precision import PRESETS, get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.model import accounting
from bitnet_jax.model.transformer import PRESETS as MODELS
from bitnet_jax.scaling.bootstrap import bootstrap_fit
from bitnet_jax.scaling.precision_fit import fit_precision_table, precision_json
from bitnet_jax.scaling.precision_laws import (LOG2_3, _eval_precision, _eval_qat_gap,
                                               effective_bits, fit_precision_law, fit_qat_gap)
from bitnet_jax.scaling.precision_optimal import optimal_precision
from bitnet_jax.scaling.results import (BIT_COLUMNS, RESULT_COLUMNS, accounting_row, read_table,
                                        write_table)

# ----------------------------------------------------------------------------------------------
# The bit columns.

RECIPES = list(PRESETS) + ["w1a16", "w2a8", "w3a4", "w4a8@g128", "w8a16@g32", "b1.58@channel",
                           "b1.58@g64", "a4.8@g32", "w16a4", "w8a8@tensor"]


def _bits(recipe: str) -> dict:
    model = MODELS["ladder-50k"]
    return accounting_row(accounting.summarize(model, get_recipe(recipe), 64), 1e6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_results_table_carries_the_bits_of_every_recipe(recipe, tmp_path):
    row = _bits(recipe)
    assert set(BIT_COLUMNS) <= set(RESULT_COLUMNS) and set(BIT_COLUMNS) <= set(row)
    r = get_recipe(recipe)
    weight = r.qkv.weight
    if recipe != "a4.8" and not recipe.startswith("a4.8"):  # uniform recipes: exact bits
        assert row["weight_bits"] == (weight.bits if weight else 16)
        assert row["act_bits"] == (r.qkv.activation.bits if r.qkv.activation else 16)
    assert row["kv_bits"] == (r.kv_cache.bits if r.kv_cache else 16)
    if "@g" in recipe:
        assert row["group_size"] == int(recipe.split("@g")[1])
        assert row["weight_granularity"] == "group"
    elif weight is None:
        assert row["group_size"] is None and row["weight_granularity"] is None
    else:  # per-channel and per-tensor: G = in_features of q/k/v and gate/up (d_model)
        assert row["group_size"] == MODELS["ladder-50k"].d_model
    path = tmp_path / "results.csv"
    write_table([{**{c: None for c in RESULT_COLUMNS}, **row}], path)
    back = read_table(path)[0]
    assert {c: back[c] for c in BIT_COLUMNS} == {c: row[c] for c in BIT_COLUMNS}


def test_mixed_recipe_bits_are_weighted_by_parameters():
    row = _bits("a4.8")  # 4-bit inputs to q/k/v and gate/up, 8-bit to attn_out and down
    assert row["weight_bits"] == 1.58 and row["kv_bits"] == 3
    assert 4 < row["act_bits"] < 6  # q/k/v and gate/up hold most of the weights


# ----------------------------------------------------------------------------------------------
# Synthetic tables from known constants.

KUMAR = dict(A=300.0, B=800.0, E=1.8, alpha=0.35, beta=0.3, gamma_w=2.5, gamma_a=1.5)
CHEN = dict(k=0.15, gamma_N=0.2, gamma_D=0.08, gamma_G=0.8, A=300.0, B=800.0, E=1.8,
            alpha=0.35, beta=0.3)
SIZES, TOKENS = (1e5, 3e5, 1e6, 3e6, 1e7), (2e7, 1e8, 5e8)
SETTINGS = ((16, 16), (1.58, 8), (2, 8), (4, 8), (8, 8), (4, 4), (8, 16), (4, 16))
GROUPS = (0, 32, 64, 128, 256)  # 0: the full-precision rows
NOISE = 0.005  # log-normal, as seed noise


def _kumar_points(rng):
    n, d, w, a = (np.array(v, float) for v in zip(*[
        (n, d, w, a) for n, d, (w, a) in itertools.product(SIZES, TOKENS, SETTINGS)]))
    kv = np.full_like(n, 16.0)
    loss = _eval_precision(KUMAR, n, d, effective_bits(w), a, kv)
    return (n, d, w, a, kv), loss * np.exp(NOISE * rng.standard_normal(len(n)))


def _chen_points(rng):
    n, d, g = (np.array(v, float) for v in zip(*itertools.product(SIZES, TOKENS, GROUPS)))
    q = (g > 0).astype(float)
    g = np.maximum(g, 2.0)
    loss = _eval_qat_gap(CHEN, n, d, g, q)
    return (n, d, g, q), loss * np.exp(NOISE * rng.standard_normal(len(n)))


def _coverage(fitter, points, truth, draws, n_boot):
    covered = {k: 0 for k in truth}
    for i in range(draws):
        x, loss = points(np.random.default_rng(1000 + i))
        fit = bootstrap_fit(fitter(*x, loss), n_boot=n_boot, seed=i)
        for k, v in truth.items():
            lo, hi = fit.intervals[k]
            covered[k] += lo <= v <= hi
    return {k: c / draws for k, c in covered.items()}


def test_precision_law_recovers_kumar_constants():
    x, loss = _kumar_points(np.random.default_rng(0))
    fit = fit_precision_law(*x, loss)
    assert set(fit.params) == {"A", "B", "E", "alpha", "beta", "gamma_w", "gamma_a"}
    for k in ("alpha", "beta", "gamma_w", "gamma_a"):
        assert fit.params[k] == pytest.approx(KUMAR[k], rel=0.1), k
    assert fit.params["E"] == pytest.approx(KUMAR["E"], rel=0.15)
    exact = fit_precision_law(*x, _eval_precision(KUMAR, x[0], x[1], effective_bits(x[2]),
                                                  x[3], x[4]))
    for k, v in KUMAR.items():
        assert exact.params[k] == pytest.approx(v, rel=1e-3), k
    assert "gamma_kv" not in fit.params  # the KV cache is never quantized in this table


def test_qat_gap_recovers_chen_constants():
    x, loss = _chen_points(np.random.default_rng(0))
    exact = fit_qat_gap(*x, _eval_qat_gap(CHEN, *x))
    for k, v in CHEN.items():
        assert exact.params[k] == pytest.approx(v, rel=1e-3), k
    fit = fit_qat_gap(*x, loss)
    assert fit.params["gamma_N"] == pytest.approx(CHEN["gamma_N"], abs=0.1)
    assert fit.params["gamma_G"] == pytest.approx(CHEN["gamma_G"], abs=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("fitter, points, truth, n_boot", [
    (fit_precision_law, _kumar_points, KUMAR, 200), (fit_qat_gap, _chen_points, CHEN, 100)],
    ids=["precision", "qat-gap"])
def test_intervals_cover_the_truth_in_90_percent_of_50_draws(fitter, points, truth, n_boot):
    # Resamples per draw (10,000 refits in all for the precision law). With 100, the gap law's
    # intervals still cover every constant in at least 47 of the 50 draws; the precision law's
    # alpha needs 200 (43 of 50 at 100: percentile ends of 100 resamples are too noisy for its
    # tails).
    coverage = _coverage(fitter, points, truth, draws=50, n_boot=n_boot)
    assert min(coverage.values()) >= 0.9, coverage


def test_ternary_counts_as_log2_3_and_16_bits_as_unquantized():
    assert effective_bits([1.58, 1.585, 2, 16])[0] == pytest.approx(LOG2_3)
    full = _eval_precision(KUMAR, 1e6, 1e8, 16.0, 16.0, 16.0)
    assert float(full) == pytest.approx(float(_eval_precision(
        {k: v for k, v in KUMAR.items() if not k.startswith("gamma")}, 1e6, 1e8, 3, 3, 3)))
    assert float(_eval_precision(KUMAR, 1e6, 1e8, LOG2_3, 16.0, 16.0)) > float(full)


def test_a_vanishing_term_evaluates_without_a_warning():
    """A fit at one data size leaves B at 0 (the main job's report printed numpy's divide-by-zero
    warning for it): the term is 0, quietly."""
    params = {**KUMAR, "B": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = float(_eval_precision(params, 1e6, 1e8, 16.0, 16.0, 16.0))
    assert value == pytest.approx(params["E"] + params["A"] * 1e6 ** -params["alpha"])


def test_fitters_refuse_degenerate_tables():
    with pytest.raises(ConfigError, match="3 distinct model sizes"):
        fit_precision_law([1e5, 1e6] * 4, [1e8] * 8, [16, 4] * 4, [16] * 8, [16] * 8,
                          [3.0, 3.1] * 4)
    x, loss = _chen_points(np.random.default_rng(0))
    with pytest.raises(ConfigError, match="no quantized rows"):
        fit_qat_gap(x[0], x[1], x[2], np.zeros_like(x[3]), loss)


# ----------------------------------------------------------------------------------------------
# A table, the comparison, fits.json and the CLI.

def _table(rng, tokens=TOKENS, seeds=(0,)):
    rows = []
    recipes = {"bf16": (16, 16, None), "b1.58": (1.58, 8, 64), "w2a8": (2, 8, 64),
               "w4a8": (4, 8, 64), "w4a8@g32": (4, 8, 32), "w4a4": (4, 4, 64)}
    for n, d, (name, (w, a, g)), seed in itertools.product(SIZES, tokens, recipes.items(),
                                                           seeds):
        loss = float(_eval_precision(KUMAR, n, d, effective_bits(w), a, 16.0))
        rows.append({c: None for c in RESULT_COLUMNS} | dict(
            run=f"{name}-{n:g}-{d:g}-{seed}", status="completed", precision=name,
            params_non_embedding=n, tokens=d, seed=seed, weight_bits=w, act_bits=a, kv_bits=16,
            group_size=g, final_eval_loss=loss * np.exp(NOISE * rng.standard_normal())))
    return rows


def test_precision_table_fit_compares_the_models_by_held_out_error():
    result = fit_precision_table(_table(np.random.default_rng(1)), law="precision", n_boot=20)
    law = result.fits["all"]
    assert law.fit.params["gamma_w"] == pytest.approx(KUMAR["gamma_w"], rel=0.15)
    assert {h.recipe for h in law.holdout} == {"bf16", "b1.58", "w2a8", "w4a8", "w4a8@g32",
                                              "w4a4"}
    scores = {s.model: s for s in result.comparison}
    assert set(scores) == {"chinchilla (no precision)", "precision", "multiplier", "qat-gap"}
    # the law that ignores precision predicts the held-out recipes worst
    assert scores["precision"].mean_abs_rel_error < scores["chinchilla (no precision)"]\
        .mean_abs_rel_error
    data = json.loads(json.dumps(precision_json(result)))
    assert set(data["laws"]["precision"]["all"]["params"]) >= {"A", "B", "E", "alpha", "beta",
                                                               "gamma_w", "gamma_a"}
    assert set(data["laws"]["qat-gap"]["w4a8"]["params"]) >= {"k", "gamma_N", "gamma_D",
                                                             "gamma_G"}
    assert data["laws"]["precision"]["all"]["holdout"][0]["recipe"]


def test_two_token_budgets_tie_beta_to_alpha():
    result = fit_precision_table(_table(np.random.default_rng(2), tokens=TOKENS[:2]),
                                 law="precision", n_boot=0, holdout=0, compare=False)
    fit = result.fits["all"].fit
    assert fit.params["beta"] == fit.params["alpha"]
    assert any("tied" in w for w in fit.warnings)


def test_table_without_bit_columns_is_one_clear_error():
    rows = [{"params_non_embedding": n, "tokens": 1e8, "final_eval_loss": 3.0} for n in SIZES]
    with pytest.raises(ConfigError, match="no bit columns"):
        fit_precision_table(rows)


@pytest.mark.slow
def test_cli_fit_law_reads_any_csv_with_the_bit_columns(tmp_path):
    rows = [{k: r[k] for k in ("precision", "params_non_embedding", "tokens", "final_eval_loss",
                               "weight_bits", "act_bits", "kv_bits", "group_size")}
            for r in _table(np.random.default_rng(3))]
    import csv

    path = tmp_path / "other.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.cli", "fit", str(path), "--law",
                          "qat-gap", "--bootstrap", "10", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)["precision"]
    assert {"w4a8", "w1.58a8", "w2a8", "w4a4"} <= set(data["laws"]["qat-gap"])
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.cli", "fit", str(path), "--law",
                          "precision", "--bootstrap", "10"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "gamma_w" in out.stdout and "models by held-out error" in out.stdout


# ----------------------------------------------------------------------------------------------
# Compute-optimal precision.

def test_optimal_precision_follows_the_law():
    # With large gammas low bits lose much of N: 16 bits win. With small ones low bits cost
    # little and are cheap: the fewest bits win.
    costly = dict(KUMAR, gamma_w=8.0, gamma_a=8.0)
    cheap = dict(KUMAR, gamma_w=0.3, gamma_a=0.3)
    assert optimal_precision(costly, [1e18])[0].weight_bits >= 8
    assert optimal_precision(cheap, [1e18])[0].weight_bits < 2
    best = optimal_precision(KUMAR, [1e16, 1e20])
    for o in best:
        assert o.loss <= o.loss_16bit
        train_bits = max(o.weight_bits, o.act_bits)
        assert 6 * o.N * o.D * train_bits / 16 == pytest.approx(o.budget, rel=1e-6)
    memory = optimal_precision(KUMAR, [1e6], "memory", tokens=1e9)[0]
    assert memory.N * memory.weight_bits / 8 == pytest.approx(1e6)
    with pytest.raises(ConfigError, match="needs the training tokens"):
        optimal_precision(KUMAR, [1e6], "memory")


def test_precision_law_refuses_settings_that_cannot_separate_the_gammas():
    """bf16 against b1.58 alone moves weight and activation bits together: one N_eff ratio for
    two gammas, refused in one line (the report then says why it has no precision law)."""
    n = np.repeat([1e5, 3e5, 1e6, 3e6], 2)
    d, w, a = 20 * n, np.tile([16.0, 1.58], 4), np.tile([16.0, 8.0], 4)
    loss = _eval_precision(KUMAR, n, d, effective_bits(w), a, 16.0)
    with pytest.raises(ConfigError, match="2 bit setting.*cannot separate 2 gammas"):
        fit_precision_law(n, d, w, a, np.full(8, 16.0), loss)
    one = fit_precision_law(n, d, w, a, np.full(8, 16.0), loss, quantities=("w",))
    assert set(one.params) == {"A", "B", "E", "alpha", "beta", "gamma_w"}
