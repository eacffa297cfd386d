"""Sweeps: expansion, plans, launching with skip/resume/retry, failures, results and reports."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bitnet_jax.scaling import sweep as sweeps
from bitnet_jax.scaling.results import read_table
from bitnet_jax.cli import main
from bitnet_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY_BASE = {
    "data": {"source": "builtin", "seq_len": 32, "max_documents": 30},
    "train": {"batch_size": 8, "eval_every": 0, "eval_batches": 2, "checkpoint_every": 10,
              "log_every": 1, "progress": False, "peak_flops": 1e11},
    "optimizer": {"warmup_steps": 2},
    "logging": {"wandb": "disabled"},
}


def write_sweep(tmp_path, axes, **extra) -> Path:
    spec = {"name": "tiny", "out_dir": str(tmp_path / "runs"), "base": TINY_BASE, "axes": axes,
            **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_axes_are_a_product_of_zipped_groups(tmp_path):
    path = write_sweep(tmp_path, [
        {"model.preset": ["ladder-50k", "ladder-100k", "ladder-200k"]},
        {"precision": ["bf16", "b1.58"], "optimizer.lr": [1e-3, 3e-3]},
    ], tokens=4096)
    sweep = sweeps.load_sweep(path)
    assert len(sweep.runs) == 6
    pairs = {(r.config.model.preset, r.config.precision, r.config.optimizer.lr) for r in sweep.runs}
    assert ("ladder-100k", "b1.58", 3e-3) in pairs and ("ladder-100k", "b1.58", 1e-3) not in pairs
    assert all(r.config.train.steps == 16 for r in sweep.runs)  # 4096 / (8 x 32)
    again = sweeps.load_sweep(path)
    assert [r.run_id for r in again.runs] == [r.run_id for r in sweep.runs]  # stable ids
    assert len({r.run_id for r in sweep.runs}) == 6
    assert all(r.run_dir.parent == tmp_path / "runs" / "tiny" for r in sweep.runs)


def test_tokens_per_param_axis(tmp_path):
    path = write_sweep(tmp_path, [{"model.preset": ["ladder-50k", "ladder-100k"]},
                                  {"tokens_per_param": [1, 2]}])
    steps = {(r.config.model.preset, r.overrides["tokens_per_param"]): r.config.train.steps
             for r in sweeps.load_sweep(path).runs}
    assert steps[("ladder-50k", 1)] == round(47_520 / 256)
    assert steps[("ladder-50k", 2)] == round(2 * 47_520 / 256)
    assert steps[("ladder-100k", 1)] == round(94_976 / 256)


@pytest.mark.parametrize("axes,extra,message", [
    ([{"precision": ["bf16", "b1.58"], "optimizer.lr": [1e-3]}], {}, "lists of one length"),
    ([{"precision": "bf16"}], {}, "needs a list of values"),
    ([{"precision": ["bf16", "b1.59"]}], {}, "unknown precision recipe 'b1.59'"),
    ([{"train.stepz": [1]}], {}, "did you mean 'steps'"),
    ([{"precision": ["bf16"]}], {"axis": []}, "did you mean 'axes'"),
])
def test_bad_sweeps_fail_before_running(tmp_path, axes, extra, message):
    with pytest.raises(ConfigError, match=message):
        sweeps.load_sweep(write_sweep(tmp_path, axes, **extra))


def test_plan_prints_runs_flops_and_time(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"model.preset": ["ladder-50k", "ladder-100k"]}], tokens=4096)
    assert main(["sweep", "plan", str(path), "--flops-per-second", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "ladder-100k" in out and "pending" in out
    sweep = sweeps.load_sweep(path)
    rows = sweeps.plan(sweep, 1e9)
    assert rows[0]["est_seconds"] == pytest.approx(rows[0]["flops_causal"] / 1e9)
    assert not (tmp_path / "runs").exists()  # planning runs nothing


def test_results_accounting_is_the_flat_view_of_summarize(tmp_path):
    """A run's accounting columns are `summarize`'s numbers (what `bitnet info` and summary.json
    show), equal to the accounting functions called directly, and all named in RESULT_COLUMNS."""
    from bitnet_jax.core.precision import get_recipe
    from bitnet_jax.model import accounting
    from bitnet_jax.model.transformer import get_model_config
    from bitnet_jax.scaling.results import RESULT_COLUMNS

    path = write_sweep(tmp_path, [{"precision": ["bf16", "b1.58"]}], tokens=4096)
    for run in sweeps.load_sweep(path).runs:
        row = sweeps.run_accounting(run)
        assert set(row) <= set(RESULT_COLUMNS)
        model = get_model_config(run.config.model.preset)
        recipe = get_recipe(run.config.precision)
        counts = accounting.param_counts(model)
        memory = accounting.weight_memory(model, recipe)
        seq_len = run.config.data.seq_len
        assert row["tokens"] == 4096 and row["steps"] == 16
        assert (row["d_model"], row["n_layers"], row["parametrization"]) == (
            model.d_model, model.n_layers, "standard")
        assert (row["params_total"], row["params_non_embedding"], row["params_embedding"],
                row["params_quantized_linear"]) == (counts.total, counts.non_embedding,
                                                    counts.embedding,
                                                    counts.quantized_linear(recipe))
        for convention in accounting.FLOP_CONVENTIONS:
            assert row[f"flops_{convention}"] == accounting.train_flops(model, 4096, convention,
                                                                        seq_len)
        for node in ("7nm", "45nm"):
            assert row[f"energy_per_token_{node}_j"] == accounting.energy_per_token(
                model, recipe, node, seq_len).total_j
        assert (row["weight_memory_bytes"], row["weight_memory_format"],
                row["weight_memory_vs_bf16"]) == (memory.total_bytes, memory.default_format,
                                                  memory.vs_bf16)
    assert row["params_quantized_linear"] > 0  # the b1.58 run quantizes its linear weights


def test_print_launcher_gives_one_command_per_run(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"precision": ["bf16", "b1.58"]}], tokens=2048)
    assert main(["sweep", "run", str(path), "--launcher", "print"]) == 0
    commands = [l for l in capsys.readouterr().out.splitlines() if "bitnet_jax.cli train" in l]
    assert len(commands) == 2 and all("--config" in c for c in commands)


@pytest.mark.slow
def test_sweep_end_to_end_with_a_failure_and_a_restart(tmp_path, capsys):
    """Five sizes x two recipes, one run diverging; then an interrupted sweep is resumed."""
    axes = [{"model.preset": ["ladder-50k", "ladder-100k", "ladder-200k", "ladder-400k",
                              "ladder-800k"]},
            {"precision": ["bf16", "b1.58"], "optimizer.lr": [3e-3, 6e-3]}]
    path = write_sweep(tmp_path, axes, tokens=5120)  # 20 steps each
    sweep = sweeps.load_sweep(path)
    bad = sweep.runs[0]
    # One deliberately failing run: its config is swapped for one with an absurd learning rate.
    outcome = sweeps.run_sweep(_with_lr(sweep, bad.run_id, 1e30), "local", workers=2)
    assert len(outcome["launched"]) == 10
    statuses = {r.run_id: sweeps.run_status(r.run_dir)["status"] for r in sweep.runs}
    assert statuses[bad.run_id] == "diverged"
    assert all(s == "completed" for k, s in statuses.items() if k != bad.run_id)

    # Interrupt the sweep: one run loses its summary (as if killed after a checkpoint), another
    # never started. Running again redoes exactly those two, skipping the rest and the failure.
    resumed, fresh = sweep.runs[3], sweep.runs[5]
    (resumed.run_dir / "summary.json").unlink()
    shutil.rmtree(fresh.run_dir)
    outcome = sweeps.run_sweep(sweep, "local")
    assert sorted(outcome["launched"]) == sorted([resumed.run_id, fresh.run_id])
    assert outcome["skipped"][bad.run_id] == "diverged"
    assert "resumed" in (resumed.run_dir / "launch.log").read_text()

    # 50 resamples instead of 1000: the same code, a twentieth of the fitting time
    assert main(["sweep", "report", str(path), "--bootstrap", "50"]) == 0
    rows = read_table(sweep.directory / "results.csv")
    assert len(rows) == 10 and sum(r["status"] == "completed" for r in rows) == 9
    assert (sweep.directory / "results.parquet").exists()
    report = (sweep.directory / "report.md").read_text()
    assert "diverged" in report and "E + A N^-alpha" in report
    for name in ("loss_vs_params", "loss_vs_flops", "loss_vs_memory", "loss_vs_energy",
                 "training_curves", "comparison"):
        assert (sweep.directory / f"{name}.png").stat().st_size > 10_000, name
        assert f"({name}.png)" in report
    # fits.json is what `bitnet fit results.csv --json` prints, held-out predictions included,
    # beside the "precision" entry that `--law precision --json` prints (two bit settings here)
    fits = json.loads((sweep.directory / "fits.json").read_text())
    capsys.readouterr()
    table = str(sweep.directory / "results.csv")
    assert main(["fit", table, "--json", "--bootstrap", "50"]) == 0
    per_recipe = json.loads(capsys.readouterr().out)
    assert main(["fit", table, "--law", "precision", "--json", "--bootstrap", "50"]) == 0
    assert {**per_recipe, **json.loads(capsys.readouterr().out)} == fits
    assert fits["recipes"]["b1.58"]["laws"]["L(N)"]["holdout"][0]["N"] == max(
        r["params_non_embedding"] for r in rows)  # 5 sizes: the largest predicted from 4
    assert "## Validation by extrapolation" in report and "## Seeds and noise" in report


def _with_lr(sweep, run_id, lr):
    """The same sweep, with one run's learning rate replaced (its id and directory kept)."""
    import dataclasses

    runs = []
    for run in sweep.runs:
        if run.run_id == run_id:
            optimizer = dataclasses.replace(run.config.optimizer, lr=lr)
            run = dataclasses.replace(run, config=dataclasses.replace(run.config,
                                                                      optimizer=optimizer))
        runs.append(run)
    return dataclasses.replace(sweep, runs=runs)


def test_collect_marks_a_crashed_process_failed(tmp_path):
    path = write_sweep(tmp_path, [{"precision": ["bf16"]}], tokens=2048)
    sweep = sweeps.load_sweep(path)
    run = sweep.runs[0]

    class Result:
        returncode, log_path = -9, "launch.log"

    jobs, _ = sweeps.jobs_to_run(sweep)
    sweeps.record_crashes(jobs, [Result()])
    status = sweeps.run_status(run.run_dir)
    assert status["status"] == "failed" and "code -9" in status["reason"]
    jobs, skipped = sweeps.jobs_to_run(sweep)
    assert not jobs and skipped == {run.run_id: "failed"}
    jobs, _ = sweeps.jobs_to_run(sweep, retry_failed=True)
    assert [j.name for j in jobs] == [run.run_id]
    assert json.loads(next(run.run_dir.parent.glob("*.failed/summary.json")).read_text())


def test_shipped_sweeps_expand(capsys):
    for name in ("quickstart", "cpu_scaling", "cpu_scaling_mup", "b1.58_ladder", "spectra_ladder"):
        sweep = sweeps.load_sweep(ROOT / "experiments" / f"{name}.yaml")
        assert len(sweep.runs) >= 8, name
    quick = sweeps.load_sweep(ROOT / "experiments" / "quickstart.yaml")
    assert {r.config.precision for r in quick.runs} == {"bf16", "b1.58"}
    assert len({r.config.model.preset for r in quick.runs}) >= 4


def test_seed_and_lr_axes_are_recorded_in_the_results_table(tmp_path):
    """`seed` sets model init and data order; every swept value lands in the table's `axes`, so
    `bitnet fit results.csv` can select over the LR and average the seeds on its own."""
    path = write_sweep(tmp_path, [{"optimizer.lr": [1e-3, 2e-3]}, {"seed": [0, 7]}], tokens=2048)
    sweep = sweeps.load_sweep(path)
    assert len(sweep.runs) == 4 and len({r.run_id for r in sweep.runs}) == 4
    for run in sweep.runs:
        seed = run.overrides["seed"]
        assert run.config.train.seed == seed and run.config.data.seed == seed
        row = sweeps.run_accounting(run)
        assert (row["seed"], row["data_seed"], row["lr"]) == (seed, seed,
                                                              run.overrides["optimizer.lr"])
        assert json.loads(row["axes"]) == {"optimizer.lr": run.config.optimizer.lr, "seed": seed}
    from bitnet_jax.scaling.select import default_hyperparameters

    assert default_hyperparameters([sweeps.run_accounting(r) for r in sweep.runs]) == \
        ("optimizer.lr",)


def test_shape_axes_are_sizes_not_hyperparameters():
    """A width ladder swept as `model.d_model` (or `model.overrides.*`) sets N; only the LR is
    selected over."""
    from bitnet_jax.scaling.select import default_hyperparameters

    rows = [{"axes": json.dumps({"model.d_model": d, "model.n_heads": d // 16, "model.d_ff": 3 * d,
                                 "model.overrides.n_layers": 2, "optimizer.lr": lr,
                                 "precision": "bf16", "seed": 0})}
            for d in (32, 64) for lr in (1e-3, 2e-3)]
    assert default_hyperparameters(rows) == ("optimizer.lr",)
