"""Laws that predict: hyperparameter envelopes, seed noise, held-out extrapolation, fits.json."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling import report
from bitnet_jax.scaling.bootstrap import bootstrap_fit
from bitnet_jax.scaling.fit import LAWS, fit_table, fits_json, format_fits
from bitnet_jax.scaling.holdout import predict_held_out, split_largest
from bitnet_jax.scaling.laws import fit_power_law
from bitnet_jax.scaling.noise import Replicates, gap_against_noise
from bitnet_jax.scaling.results import RESULT_COLUMNS, read_table, write_table
from bitnet_jax.scaling.trust import CHECKS, law_checks

SIZES = np.geomspace(5e4, 5e6, 6)
E, A, ALPHA = 1.8, 40.0, 0.35
LRS = (1e-3, 2e-3, 4e-3, 8e-3)


def law(n):
    return E + A * n ** -ALPHA


def best_lr(n):
    """The optimum LR falls with size: 4e-3 at the smallest, below 1e-3 at the largest."""
    return 4e-3 * (n / SIZES[0]) ** -0.35


def lr_rows(recipes=(("bf16", 1.0),), seeds=(0,), noise=0.0, rng_seed=0):
    """A sweep's table: size x recipe x LR x seed, loss = law x (1 + 0.02 log(lr / lr*)^2)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for recipe, scale in recipes:
        for n in SIZES:
            for lr in LRS:
                for seed in seeds:
                    penalty = 1 + 0.02 * np.log(lr / best_lr(n)) ** 2
                    loss = scale * law(n) * penalty * np.exp(rng.normal(0, noise))
                    row = {c: None for c in RESULT_COLUMNS}
                    row.update(run=f"{recipe}-{n:.0f}-{lr}-{seed}", status="completed",
                               precision=recipe, params_non_embedding=int(n), tokens=10 ** 6,
                               final_eval_loss=loss, lr=lr, seed=seed, data_seed=seed,
                               flops_causal=6e6 * n, weight_memory_bytes=2 * n,
                               energy_per_token_7nm_j=1e-12 * n,
                               axes=json.dumps({"model.preset": f"ladder-{n:.0f}",
                                                "precision": recipe, "optimizer.lr": lr,
                                                "seed": seed}))
                    rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Hyperparameter envelope.

def test_envelope_takes_the_best_lr_per_size_and_flags_the_edges(tmp_path):
    path = tmp_path / "results.csv"
    write_table(lr_rows(), path)  # the selection works from results.csv alone
    group = fit_table(path, n_boot=0, holdout=0)["bf16"]
    assert len(group.runs) == len(SIZES) and group.n_points == len(SIZES)
    assert [c.keys for c in group.choices] == [("optimizer.lr",)] * len(SIZES)
    for choice in group.choices:
        expected = min(LRS, key=lambda lr: abs(np.log(lr / best_lr(choice.N))))
        assert choice.winner_dict == {"optimizer.lr": expected}, choice.N
        assert choice.loss == pytest.approx(min(loss for _, loss in choice.tried))
        assert len(choice.tried) == len(LRS)
        at_edge = expected in (LRS[0], LRS[-1])
        assert (choice.edges == ("optimizer.lr",)) == at_edge, choice.N
    # the smallest LR wins at the largest sizes: flagged, in the fit's warnings too
    flagged = [c for c in group.choices if c.edges]
    assert flagged and all(c.winner[0] == LRS[0] for c in flagged)
    warnings = group.laws["L(N)"].warnings
    assert any("optimum not bracketed" in w and "smallest of [0.001, 0.002, 0.004, 0.008]" in w
               for w in warnings)
    # the envelope follows the law (up to the penalty at the unbracketed sizes)
    assert group.offset.params["alpha"] == pytest.approx(ALPHA, rel=0.25)
    assert "best optimizer.lr per size" in format_fits({"bf16": group})


def test_hyperparameters_from_a_column_and_explicit_lists():
    rows = lr_rows(seeds=(0,))
    for row in rows:
        row.pop("axes")  # a table from elsewhere: no axes column, the LR in `lr`
    group = fit_table(rows, n_boot=0, holdout=0)["bf16"]
    assert not group.choices and len(group.runs) == len(rows)  # nothing known to be swept
    group = fit_table(rows, hyperparameters=["optimizer.lr"], n_boot=0, holdout=0)["bf16"]
    assert len(group.runs) == len(SIZES) and group.choices[0].keys == ("optimizer.lr",)
    # a swept key left out of an explicit list splits the recipe instead of being selected over
    mixed = lr_rows(seeds=(0,))
    for row in mixed:
        axes = json.loads(row["axes"])
        row["axes"] = json.dumps({**axes, "model.parametrization": "mup"})
    fits = fit_table(mixed, hyperparameters=["optimizer.lr"], n_boot=0, holdout=0)
    assert list(fits) == ["bf16, model.parametrization=mup"]
    # an LR zipped with the recipe (one value per size) is not a selection
    zipped = [r for r in lr_rows() if r["lr"] == LRS[1]]
    group = fit_table(zipped, n_boot=0, holdout=0)["bf16"]
    assert not group.choices and len(group.runs) == len(SIZES)


# ----------------------------------------------------------------------------------------------
# Seeds.

def test_seed_replicates_give_the_spread_the_intervals_and_the_gap_against_noise():
    rows = lr_rows(recipes=(("bf16", 1.0), ("b1.58", 1.004)), seeds=(0, 1, 2), noise=0.003,
                   rng_seed=4)
    fits = fit_table(rows, n_boot=200, holdout=0)
    bf16, ternary = fits["bf16"], fits["b1.58"]
    reps = bf16.replicates
    assert list(reps.counts) == [3] * len(SIZES) and bf16.n_points == 3 * len(SIZES)
    # the best LR is chosen per seed; the law is fitted to the mean per size
    assert len(bf16.choices) == 3 * len(SIZES) and bf16.offset.n_points == len(SIZES)
    assert reps.log_sd == pytest.approx(0.003, rel=0.5)
    lo, hi = bf16.offset.intervals["alpha"]
    assert lo < ALPHA < hi
    assert "seed-to-seed spread" in format_fits(fits)
    gaps = gap_against_noise(ternary.replicates, reps)
    assert len(gaps) == len(SIZES) and all(g.seeds == (3, 3) for g in gaps)
    # a 0.4% gap against 0.3% noise of single runs: seen at some sizes, not at all of them
    assert all(g.low < g.gap < g.high for g in gaps)
    one_seed = gap_against_noise(Replicates((np.array([1.0]),), (np.array([2.0]),)),
                                 Replicates((np.array([1.0]),), (np.array([1.9, 1.95]),)))
    assert one_seed[0].exceeds is None and one_seed[0].gap == pytest.approx(0.075)


def test_selecting_by_the_mean_over_seeds_keeps_every_seed_at_one_winner(tmp_path, capsys):
    from bitnet_jax.cli import main

    # Noise as large as the LR penalty: each seed's own winner wanders, the mean's does not.
    rows = lr_rows(seeds=(0, 1, 2), noise=0.02, rng_seed=3)
    per_seed = fit_table(rows, n_boot=0, holdout=0)["bf16"]
    by_mean = fit_table(rows, n_boot=0, holdout=0, select_by="mean")["bf16"]
    assert len(per_seed.choices) == 3 * len(SIZES) and len(by_mean.choices) == len(SIZES)
    for choice in by_mean.choices:
        assert choice.seed is None
        kept = [r for r in by_mean.runs if r["params_non_embedding"] == choice.N]
        assert sorted(r["seed"] for r in kept) == [0, 1, 2]
        assert {r["lr"] for r in kept} == {choice.winner[0]}
        means = {lr: np.mean([r["final_eval_loss"] for r in rows if r["lr"] == lr
                              and r["params_non_embedding"] == choice.N]) for lr in LRS}
        assert choice.winner[0] == min(means, key=means.get)
        assert choice.loss == pytest.approx(min(means.values()))
    assert list(by_mean.replicates.counts) == [3] * len(SIZES)
    # the per-seed minimum is never above the mean's winner (it picks the luckiest run)
    assert np.all(per_seed.replicates.means <= by_mean.replicates.means + 1e-12)
    with pytest.raises(ConfigError, match="select_by"):
        fit_table(rows, select_by="best")
    path = tmp_path / "results.csv"
    write_table(rows, path)
    assert main(["fit", str(path), "--bootstrap", "0", "--select-by", "mean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(fits_json(
        fit_table(rows, n_boot=0, select_by="mean"))))


def test_recipes_bootstrap_from_independent_streams_so_ratio_bands_carry_both_noises():
    from bitnet_jax.scaling.compare import loss_ratio_band

    # Two recipes with the very same losses: their ratio is 1, and its band must still carry
    # the seed noise of both (one shared stream made every pair move together: a band of 0).
    rows = lr_rows(recipes=(("bf16", 1.0),), seeds=(0, 1, 2), noise=0.01, rng_seed=2)
    twin = [{**r, "precision": "b1.58", "run": "twin-" + r["run"],
             "axes": r["axes"].replace('"bf16"', '"b1.58"')} for r in rows]
    fits = fit_table(rows + twin, n_boot=200, holdout=0)
    band = loss_ratio_band(fits["b1.58"].offset, fits["bf16"].offset, SIZES[-1])
    assert band.value == pytest.approx(1.0)
    assert band.lo < 0.995 and band.hi > 1.005
    # and the streams are still reproducible: the same table gives the same intervals
    again = fit_table(rows + twin, n_boot=200, holdout=0)
    assert again["b1.58"].offset.intervals == fits["b1.58"].offset.intervals


def test_a_gap_far_above_the_noise_is_called_so():
    rng = np.random.default_rng(0)
    x = (np.array([1e5, 1e6]),)
    ref = Replicates(x, tuple(2.0 + rng.normal(0, 0.002, 4) for _ in range(2)))
    # 0.1 above at the first size; the same runs in another order at the second (no gap)
    big = Replicates(x, (2.1 + rng.normal(0, 0.002, 4), ref.losses[1][::-1]))
    first, second = gap_against_noise(big, ref)
    assert first.exceeds is True and second.exceeds is False


# ----------------------------------------------------------------------------------------------
# Holdout.

def _held_out_inside(fitter, loss_fn, seeds, draws, n_boot):
    """Over `draws` noisy tables, whether the largest size falls inside its 95% band when
    predicted by `fitter` fitted on the others (the machinery `fit_table` runs per law)."""
    inside, errors = [], []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        n = np.repeat(SIZES, seeds)
        reps = Replicates.from_points([n], loss_fn(n) * np.exp(rng.normal(0, 0.004, len(n))))
        kept, held = split_largest(reps, 1)
        rest = reps.subset(kept)
        fit = bootstrap_fit(fitter(rest.x[0], rest.means), n_boot=n_boot, seed=draw,
                            resample=rest.resampler(1) if rest.has_replicates else None)
        (h,) = predict_held_out(fit, rest, reps.subset(held), seed=draw)
        inside.append(h.inside)
        errors.append(h.rel_error)
    return np.array(inside), np.array(errors)


def test_held_out_sizes_fall_inside_their_bands_at_the_nominal_rate():
    # A known law (pure power law, 0.4% noise, 3 seeds): over 100 draws the largest size should
    # fall inside its 95% band ~95 times. Binomial sd at 100 draws is ~2.2 points; percentiles of
    # 100 resamples and the estimated noise add some slack: accept 86-100 (measured: 92).
    inside, errors = _held_out_inside(fit_power_law, lambda n: A * n ** -0.1, seeds=3,
                                      draws=100, n_boot=100)
    assert 0.86 <= inside.mean() <= 1.0, inside.mean()
    assert abs(np.median(errors)) < 0.003  # unbiased


def test_a_wrong_law_is_caught_by_its_held_out_errors():
    # Data with a strong floor (E = 1.8) fitted by a law without one: the pure power law bends
    # the wrong way beyond the data and misses the largest size outside its band every time.
    inside, errors = _held_out_inside(fit_power_law, law, seeds=3, draws=10, n_boot=100)
    assert not inside.any() and np.all(errors < -0.005)


def test_a_law_that_ignores_d_is_caught_when_d_grows_with_n():
    # Data from L(N, D) with D = 20 N (so compute grows with both): L(N) attributes the gains
    # of D to N; its prediction of the largest run misses, while the true law is not asked here.
    rng = np.random.default_rng(1)
    rows = [{"params": n, "tokens": 20 * n, "seed": s, "recipe": "bf16",
             "loss": (1.69 + 406.4 * n ** -0.34 + 410.7 * (20 * n) ** -0.28 + 0.3 * (n < 2e5))
             * np.exp(rng.normal(0, 0.002))}
            for n in np.geomspace(1e5, 1e8, 7) for s in range(3)]
    group = fit_table(rows, n_boot=100, chinchilla=False)["bf16"]
    (held,) = group.laws["L(N)"].holdout
    assert held.N == pytest.approx(1e8) and held.D == pytest.approx(2e9)
    assert held.inside is False


def test_fit_table_holds_out_the_largest_sizes_where_enough_remain():
    rows = [{"params": n, "loss": law(n), "recipe": "bf16"} for n in SIZES]
    group = fit_table(rows, n_boot=50, holdout=2)["bf16"]
    held = group.laws["L(N)"].holdout
    assert [h.N for h in held] == pytest.approx(list(SIZES[-2:]))
    assert all(abs(h.rel_error) < 1e-3 for h in held)  # the law is exact
    few = fit_table(rows[:4], n_boot=0)["bf16"]  # 3 sizes left: L(N) needs 4 points
    assert not few.laws["L(N)"].holdout
    assert any("not validated by holdout" in w for w in few.laws["L(N)"].warnings)
    assert len(few.laws["L(N)-pure"].holdout) == 1  # the pure law needs 3
    with pytest.raises(ConfigError, match="holdout"):
        fit_table(rows, holdout=-1)


# ----------------------------------------------------------------------------------------------
# fits.json.

HOLDOUT_KEYS = {"N", "D", "observed", "predicted", "low", "high", "rel_error"}
LAW_KEYS = {"params", "interval", "r2", "points", "warnings", "holdout", "checks"}


def check_fits_schema(data):
    assert set(data) == {"recipes"}
    for recipe, entry in data["recipes"].items():
        assert set(entry) == {"laws"}, recipe
        for name, law_entry in entry["laws"].items():
            assert name in LAWS and set(law_entry) == LAW_KEYS, (recipe, name)
            assert all(isinstance(v, float) for v in law_entry["params"].values())
            for key, band in law_entry["interval"].items():
                assert key in law_entry["params"] and len(band) == 2 and band[0] <= band[1]
            assert isinstance(law_entry["points"], int)
            assert all(isinstance(w, str) for w in law_entry["warnings"])
            assert set(law_entry["checks"]) == set(CHECKS)
            for check in law_entry["checks"].values():
                assert check["passed"] in (True, False, None) and isinstance(check["detail"], str)
            for h in law_entry["holdout"]:
                assert set(h) == HOLDOUT_KEYS
                assert h["rel_error"] == pytest.approx((h["predicted"] - h["observed"])
                                                       / h["observed"])


def test_fits_json_follows_the_schema_and_bitnet_fit_prints_it(tmp_path, capsys):
    from bitnet_jax.cli import main

    path = tmp_path / "results.csv"
    write_table(lr_rows(recipes=(("bf16", 1.0), ("b1.58", 1.03))), path)
    assert main(["fit", str(path), "--bootstrap", "50", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    check_fits_schema(printed)
    assert set(printed["recipes"]) == {"bf16", "b1.58"}
    assert set(printed["recipes"]["bf16"]["laws"]) == {"L(N)", "L(N)-pure"}
    offset = printed["recipes"]["bf16"]["laws"]["L(N)"]
    assert offset["points"] == len(SIZES) and len(offset["holdout"]) == 1
    assert any("optimum not bracketed" in w for w in offset["warnings"])
    expected = fits_json(fit_table(read_table(path), n_boot=50))
    assert printed == json.loads(json.dumps(expected))
    assert main(["fit", str(path), "--bootstrap", "50", "--json", "--holdout", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["recipes"]["bf16"]["laws"]["L(N)"]["holdout"] == []


def test_the_report_writes_fits_json_and_its_sections(tmp_path):
    rows = lr_rows(recipes=(("bf16", 1.0), ("b1.58", 1.03)), seeds=(0, 1), noise=0.002)
    path = report.write_report_files("synthetic", rows, tmp_path, {}, n_boot=50)
    data = json.loads((tmp_path / "fits.json").read_text())
    check_fits_schema(data)
    assert data == json.loads(json.dumps(fits_json(report.fit_laws(rows, n_boot=50))))
    text = path.read_text()
    for needle in ("## Hyperparameter selection", "## Seeds and noise", "exceeds the noise",
                   "## Validation by extrapolation", "optimum bracketed",
                   "## Can these laws be used?", "held out within 1.5%",
                   "(loss_vs_optimizer_lr.png)"):
        assert needle in text, needle
    assert (tmp_path / "loss_vs_optimizer_lr.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------
# Can a law be used? (`trust`): each check passes on a law its data determine and fails, for
# its own reason, on data that do not.

def steepening(n):
    """A loss that falls faster than a power law (no floor can describe it)."""
    return A * n ** -0.1 * np.exp(-0.01 * np.log(n / 5e4) ** 2)


def seeded_rows(loss_of_n, sizes, seeds=3, noise=0.003, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return [{"params": float(n), "seed": s, "recipe": "bf16",
             "loss": float(loss_of_n(n) * np.exp(rng.normal(0, noise)))}
            for n in sizes for s in range(seeds)]


def checks_of(rows, law_name="L(N)", n_boot=200, **kwargs):
    law_fit = fit_table(rows, n_boot=n_boot, **kwargs)["bf16"].laws[law_name]
    return law_fit, {c.name: c for c in law_fit.checks}


def test_a_law_its_data_determine_passes_every_check():
    # E + A N^-alpha over 250x in N, 3 seeds at 0.3% noise: E, alpha placed, the largest size
    # predicted within its band.
    law_fit, checks = checks_of(seeded_rows(law, np.geomspace(5e4, 1.25e7, 8)))
    assert law_fit.trusted, {k: (c.passed, c.detail) for k, c in checks.items()}
    assert checks["falls"].detail == "falls at all 7 steps"
    assert checks["resamples"].detail == "0 of 200 failed"


def test_each_check_fails_for_its_own_class_of_data():
    # Loss falling faster than any power law: E would be negative, so sits at its bound 0.
    _, checks = checks_of(seeded_rows(steepening, np.geomspace(5e4, 5e6, 6)))
    assert checks["bounds"].passed is False and "E" in checks["bounds"].detail
    # Noise as large as the steps between sizes over a narrow range: the exponent is not placed.
    _, checks = checks_of(seeded_rows(law, np.geomspace(5e4, 2e5, 5), noise=0.02))
    assert checks["exponents"].passed is False and "alpha" in checks["exponents"].detail
    # The wrong law (no floor on data with one): the held-out size is missed.
    _, checks = checks_of(seeded_rows(law, np.geomspace(5e4, 5e6, 6)), law_name="L(N)-pure")
    assert checks["holdout"].passed is False and "outside" in checks["holdout"].detail
    # A size whose loss rises: named, with the step.
    sizes = np.geomspace(5e4, 5e6, 6)
    _, checks = checks_of(seeded_rows(lambda n: law(n) * (1.1 if n == sizes[3] else 1.0), sizes,
                                      noise=0.0))
    assert checks["falls"].passed is False
    assert checks["falls"].detail.startswith(f"rises at N = {sizes[2]:.4g} to {sizes[3]:.4g}: +")


def test_checks_that_cannot_be_made_are_neither_passed_nor_failed():
    rows = seeded_rows(law, np.geomspace(5e4, 5e6, 6), seeds=1)
    law_fit, checks = checks_of(rows, n_boot=0, holdout=0)
    assert checks["resamples"].passed is None and checks["exponents"].passed is None
    assert checks["holdout"].passed is None and not law_fit.trusted
    # Failed resamples are counted: a fit whose bootstrap lost some draws fails the check.
    fitted = fit_table(rows, n_boot=50)["bf16"]
    law_fit = fitted.laws["L(N)"]
    lossy = dataclasses.replace(law_fit.fit, n_boot_failed=3)
    (check,) = [c for c in law_checks(lossy, law_fit.holdout, fitted.replicates)
                if c.name == "resamples"]
    assert check.passed is False and check.detail == "3 of 53 failed"


def test_bitnet_fit_names_the_checks_a_law_does_not_pass(tmp_path, capsys):
    from bitnet_jax.cli import main

    def fit_printed(loss_of_n, sizes):
        path = tmp_path / "results.csv"
        write_table([{**{c: None for c in RESULT_COLUMNS}, "run": f"r{i}", "status": "completed",
                      "precision": r["recipe"], "params_non_embedding": int(r["params"]),
                      "tokens": 10 ** 6, "final_eval_loss": r["loss"], "seed": r["seed"]}
                     for i, r in enumerate(seeded_rows(loss_of_n, sizes))], path)
        assert main(["fit", str(path), "--bootstrap", "100"]) == 0
        return capsys.readouterr().out

    out = fit_printed(steepening, np.geomspace(5e4, 5e6, 6))
    assert "checks not passed: no parameter at a bound: no (at a bound: E)" in out
    assert "checks: all passed" in fit_printed(law, np.geomspace(5e4, 1.25e7, 8))
