"""Downstream scores in a sweep: the `eval:` block, lm-eval results as results columns, rescoring
when the spec changes, the score-against-loss fit, and a sweep scored end to end on the shipped
local lm-eval task (tests/lm_eval_tasks)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bitnet_jax.cli import main
from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling import sweep as sweeps
from bitnet_jax.scaling.downstream import (EvalSpec, downstream_fits, fit_score_against_loss,
                                           score_columns, scored_with)
from bitnet_jax.scaling.results import read_table, write_table

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "lm_eval_tasks"
TINY_BASE = {
    "data": {"source": "builtin", "seq_len": 64, "max_documents": 30},
    "train": {"batch_size": 8, "eval_every": 0, "eval_batches": 2, "checkpoint_every": 100,
              "log_every": 1, "progress": False, "peak_flops": 1e11},
    "optimizer": {"warmup_steps": 2},
    "logging": {"wandb": "disabled"},
}

# What lm-eval 0.4 writes for one multiple-choice task and one generation task.
LM_EVAL_RESULTS = {"results": {
    "tiny_choice": {"alias": "tiny_choice", "acc,none": 0.5, "acc_stderr,none": "N/A",
                    "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.1},
    "tiny_gen": {"alias": "tiny_gen", "exact_match,strict-match": 0.125,
                 "exact_match_stderr,strict-match": "N/A", "exact_match,none": 0.0}}}


def write_sweep(tmp_path, eval_block, axes=None, **extra) -> Path:
    spec = {"name": "scored", "out_dir": str(tmp_path / "runs"), "base": TINY_BASE,
            "axes": axes or [{"model.preset": ["ladder-50k", "ladder-100k", "ladder-200k"]}],
            "tokens": 4096, "eval": eval_block, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_lm_eval_results_become_one_column_per_metric():
    assert score_columns(LM_EVAL_RESULTS) == {
        "eval/tiny_choice/acc": 0.5, "eval/tiny_choice/acc_norm": 0.25,
        "eval/tiny_gen/exact_match/strict-match": 0.125, "eval/tiny_gen/exact_match": 0.0}
    assert score_columns({}) == {}


def test_score_columns_follow_the_result_columns_through_csv(tmp_path):
    rows = [{"run": "a", "status": "completed", **score_columns(LM_EVAL_RESULTS)},
            {"run": "b", "status": "failed"}]
    write_table(rows, tmp_path / "results.csv")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == sorted(score_columns(LM_EVAL_RESULTS))
    back = read_table(tmp_path / "results.csv")
    assert back[0]["eval/tiny_choice/acc"] == 0.5 and back[1]["eval/tiny_choice/acc"] is None


@pytest.mark.parametrize("block, message", [
    ({"tasks": []}, "eval.tasks"),
    ({"tasks": "x", "shots": 1}, "unknown key"),
    ({"tasks": ["x"], "include_path": "missing_dir"}, "no directory"),
    ({"tasks": ["x"], "limit": 0}, "eval.limit"),
    ({"tasks": ["x"], "num_fewshot": -1}, "num_fewshot"),
    ({"tasks": ["x"], "batch_size": 0}, "batch_size"),
    (["x"], "mapping"),
])
def test_bad_eval_blocks_fail_when_the_sweep_loads(tmp_path, block, message):
    with pytest.raises(ConfigError, match=message):
        sweeps.load_sweep(write_sweep(tmp_path, block))


def test_the_eval_block_reads_include_path_beside_the_sweep_file(tmp_path):
    (tmp_path / "tasks").mkdir()
    sweep = sweeps.load_sweep(write_sweep(tmp_path, {"tasks": "a, b", "include_path": "tasks",
                                                     "limit": 20.0}))
    assert sweep.eval == EvalSpec(("a", "b"), str(tmp_path / "tasks"), 20, None, 8)
    assert EvalSpec.from_json(sweep.eval.to_json()) == sweep.eval


def test_finished_runs_are_scored_once_per_spec(tmp_path):
    """A completed run without scores gets a scoring job; with scores of this spec it is
    skipped; after the spec changes it is scored again."""
    path = write_sweep(tmp_path, {"tasks": ["tiny_choice"]})
    sweep = sweeps.load_sweep(path)
    for run in sweep.runs:
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "summary.json").write_text(json.dumps({"status": "completed", "step": 1}))
    jobs, skipped = sweeps.jobs_to_run(sweep)
    assert len(jobs) == 3 and not skipped
    assert all(job.argv[-2] == "--lm-eval" for job in jobs)
    assert EvalSpec.from_json(json.loads(Path(jobs[0].argv[-1]).read_text())) == sweep.eval

    scored = sweep.runs[0].run_dir
    (scored / "lm_eval.json").write_text(json.dumps({"spec": sweep.eval.to_json(),
                                                     **LM_EVAL_RESULTS}))
    assert scored_with(scored, sweep.eval)
    jobs, skipped = sweeps.jobs_to_run(sweep)
    assert len(jobs) == 2 and skipped == {sweep.runs[0].run_id: "completed"}
    row = sweeps.collect_run(sweep.runs[0])
    assert row["eval/tiny_choice/acc"] == 0.5 and row["final_eval_loss"] is None

    changed = sweeps.load_sweep(write_sweep(tmp_path, {"tasks": ["tiny_choice"], "limit": 5}))
    jobs, _ = sweeps.jobs_to_run(changed)
    assert len(jobs) == 3
    (scored / "lm_eval.json").write_text("{not json")  # damaged: rescored, the row still reads
    assert not scored_with(scored, sweep.eval)
    assert "lm_eval.json" in sweeps.collect_run(sweep.runs[0])["error"]


def test_score_against_loss_recovers_a_known_line():
    rng = np.random.default_rng(0)
    loss = np.linspace(2.0, 3.5, 12)
    score = 1.4 - 0.3 * loss + rng.normal(0, 0.01, loss.size)
    fit = fit_score_against_loss(loss, score)
    assert fit["slope"] == pytest.approx(-0.3, abs=0.02)
    low, high = fit["slope_interval"]
    assert low < -0.3 < high and high - low < 0.05
    assert fit_score_against_loss(np.array([2.0, 2.0, 3.0]), np.zeros(3)) is None


def test_downstream_fits_per_recipe_over_completed_scored_runs():
    rows = [{"run": f"{recipe}{n}", "status": "completed", "precision": recipe,
             "params_non_embedding": n, "tokens": 1e6, "final_eval_loss": 3.0 - 0.1 * i,
             "eval/t/acc": 0.2 + 0.05 * i}
            for recipe in ("bf16", "b1.58") for i, n in enumerate((10, 20, 40, 80))]
    rows.append({**rows[0], "run": "failed", "status": "failed"})
    rows.append({**rows[1], "run": "unscored", "eval/t/acc": None})
    fits = downstream_fits(rows, n_boot=50)
    assert list(fits) == ["eval/t/acc"] and set(fits["eval/t/acc"]) == {"bf16", "b1.58"}
    bf16 = fits["eval/t/acc"]["bf16"]
    assert [p["N"] for p in bf16["points"]] == [10, 20, 40, 80]
    assert bf16["against_loss"]["slope"] == pytest.approx(-0.5)
    assert bf16["spearman_with_N"] == pytest.approx(1.0)
    assert downstream_fits([{**r, "eval/t/acc": None} for r in rows]) == {}


@pytest.mark.slow
def test_a_sweep_scores_its_runs_on_a_local_task_end_to_end(tmp_path, monkeypatch, capsys):
    """Three sizes trained and scored by lm-eval in their own jobs; the scores reach
    results.csv, fits.json and the report; a second `sweep run` has nothing to do."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_sweep(tmp_path, {"tasks": ["bitnet_tiny_choice"],
                                  "include_path": str(TASKS_DIR), "batch_size": 4})
    assert main(["sweep", "run", str(path), "--bootstrap", "50"]) == 0
    sweep = sweeps.load_sweep(path)
    rows = read_table(sweep.directory / "results.csv")
    assert all(0.0 <= r["eval/bitnet_tiny_choice/acc"] <= 1.0 for r in rows)
    for run in sweep.runs:
        scores = json.loads((run.run_dir / "lm_eval.json").read_text())
        assert scores["spec"] == sweep.eval.to_json()
        assert scores["n-samples"]["bitnet_tiny_choice"]["effective"] > 0
    fits = json.loads((sweep.directory / "fits.json").read_text())
    [(recipe, fit)] = fits["downstream"]["eval/bitnet_tiny_choice/acc"].items()
    assert recipe == "b1.58" and len(fit["points"]) == 3
    report = (sweep.directory / "report.md").read_text()
    assert "## Downstream scores" in report and "(downstream.png)" in report
    assert (sweep.directory / "downstream.png").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["sweep", "run", str(path), "--bootstrap", "50"]) == 0
    assert capsys.readouterr().out.count("skipped") == 3


def test_a_misspelt_task_fails_before_any_run_trains(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    path = write_sweep(tmp_path, {"tasks": ["bitnet_tiny_chioce"],
                                  "include_path": str(TASKS_DIR)})
    assert main(["sweep", "run", str(path)]) == 2
    assert "unknown lm-eval task(s) ['bitnet_tiny_chioce']" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "scored").exists() or not any(
        p.name.startswith("ladder") for p in (tmp_path / "runs" / "scored").iterdir())
