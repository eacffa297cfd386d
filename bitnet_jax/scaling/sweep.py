"""Sweeps: expand a grid of run configs, plan them, launch them, collect one results table.

A sweep file holds a base run config and a list of axes:

    name: quickstart
    base: {...}                      # any `bitnet train` config (or `base_config: FILE.yaml`)
    axes:                            # the product of the axes ...
      - model.preset: [ladder-50k, ladder-100k]
      - precision: [bf16, b1.58]     # ... while keys inside one axis are zipped
        optimizer.lr: [2.0e-3, 4.0e-3]
    tokens_per_param: 20             # optional, or `tokens: 2.0e6`, or either as an axis key
    eval: {tasks: [arc_easy]}        # optional: lm-eval tasks each run is scored on (`downstream`)

`tokens` and `tokens_per_param` (per non-embedding parameter) set `train.steps` from the batch
and sequence length. `seed` sets both `train.seed` (model init) and `data.seed` (data order): a
seed axis gives replicates whose spread the report measures. Any other key (e.g. `optimizer.lr`)
is a hyperparameter axis: the fits take the best run over it per size (see `select`). Every run
gets a stable id from its expanded config, and its directory is `out_dir/<sweep name>/<run id>/`. Re-running a sweep skips finished runs, resumes interrupted
ones, and retries failed ones only when asked.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Optional

import yaml

from bitnet_jax import run_files
from bitnet_jax.model import accounting as compute
from bitnet_jax.config import (RunConfig, apply_overrides, from_dict, read_yaml, to_dict,
                               unknown_key_error)
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.files import read_json_object, write_text_atomic
from bitnet_jax.scaling.downstream import EvalSpec, read_run_scores, score_columns, scored_with
from bitnet_jax.scaling.launch import Job, format_duration
from bitnet_jax.scaling.results import (AXES, DATA_SEED, RESULT_COLUMNS, SEED, accounting_row,
                                        write_parquet, write_table)
from bitnet_jax.model.resolve import ResolvedRun, resolve_model, resolve_run

TOKEN_KEYS = ("tokens", "tokens_per_param")
SEED_KEY = "seed"  # an axis key: the seeds of model init and data order together
SWEEP_KEYS = ("name", "out_dir", "base", "base_config", "axes", "eval") + TOKEN_KEYS
FINISHED, FAILED = ("completed",), ("failed", "diverged")


@dataclasses.dataclass
class Run:
    """One expanded run of a sweep."""

    run_id: str
    config: RunConfig
    overrides: dict  # the axis values that made it (for tables and plans)
    # The config's model config and recipes, resolved (and the config checked) at construction.
    resolved: ResolvedRun = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.resolved = resolve_run(self.config)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir) / self.run_id


@dataclasses.dataclass
class Sweep:
    name: str
    directory: Path
    runs: list[Run]
    eval: Optional[EvalSpec] = None  # lm-eval tasks each run is scored on after training


# ----------------------------------------------------------------------------------------------
# Expansion.

def _axis_points(axis: dict, index: int) -> list[dict]:
    """One axis -> a list of {key: value} points (its keys zipped)."""
    require(isinstance(axis, dict) and axis,
            f"sweep axes[{index}] must be a mapping of key: [values], got {axis!r}")
    lengths = {key: len(values) for key, values in axis.items() if isinstance(values, list)}
    require(len(lengths) == len(axis),
            f"sweep axes[{index}]: every key needs a list of values, got {axis!r}")
    require(len(set(lengths.values())) == 1,
            f"sweep axes[{index}]: zipped keys need lists of one length, got {lengths}")
    keys = list(axis)
    return [dict(zip(keys, values)) for values in zip(*(axis[k] for k in keys))]


def _set_steps_from_tokens(tree: dict, config: RunConfig, tokens: Optional[float],
                           tokens_per_param: Optional[float]) -> None:
    if tokens is None and tokens_per_param is None:
        return
    for key, value in (("tokens", tokens), ("tokens_per_param", tokens_per_param)):
        require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and value > 0),
                f"sweep {key}={value!r}: give a positive number (e.g. {key}: 2.0e6)")
    require(tokens is None or tokens_per_param is None,
            "a sweep run gets either tokens or tokens_per_param, not both")
    if tokens_per_param is not None:
        model = resolve_model(config.model)
        tokens = tokens_per_param * compute.param_counts(model).non_embedding
    per_step = config.train.batch_size * config.data.seq_len
    steps = max(1, round(tokens / per_step))
    tree.setdefault("train", {})["steps"] = steps
    # Warm-up cannot outlast a short run: keep it at most 10% of the steps.
    warmup = tree.get("optimizer", {}).get("warmup_steps", config.optimizer.warmup_steps)
    if warmup >= steps:
        tree.setdefault("optimizer", {})["warmup_steps"] = max(0, steps // 10)


def _stable_id(config: RunConfig) -> str:
    from bitnet_jax.train.loop import run_name  # the trainer's own naming, so both agree

    return run_name(dataclasses.replace(config, name=None))


def load_sweep(path: str | Path, overrides: Optional[list[str]] = None) -> Sweep:
    """Read a sweep file and expand it into validated run configs (no compute)."""
    spec = read_yaml(path)
    for key in spec:
        if key not in SWEEP_KEYS:
            raise unknown_key_error(str(key), list(SWEEP_KEYS), "sweep.")
    name = spec.get("name") or Path(path).stem
    if "base_config" in spec:
        base = read_yaml(Path(path).parent / spec["base_config"])
        base = _merge(base, spec.get("base", {}))
    else:
        base = copy.deepcopy(spec.get("base", {}))
    base = apply_overrides(base, list(overrides or []))
    axes = spec.get("axes", [])
    require(isinstance(axes, list), "sweep axes must be a list of mappings (one per axis)")
    directory = Path(spec.get("out_dir", base.get("out_dir", "runs"))) / name

    runs, seen = [], set()
    for combination in itertools.product(*[_axis_points(a, i) for i, a in enumerate(axes)]):
        point = {k: v for part in combination for k, v in part.items()}
        tree = copy.deepcopy(base)
        tokens = point.get("tokens", spec.get("tokens"))
        per_param = point.get("tokens_per_param", spec.get("tokens_per_param"))
        apply_overrides(tree, _point_overrides(point))
        tree["out_dir"] = str(directory)
        config = from_dict(RunConfig, tree)
        _set_steps_from_tokens(tree, config, tokens, per_param)
        config = from_dict(RunConfig, tree)
        run_id = _stable_id(config)
        run = Run(run_id, dataclasses.replace(config, name=run_id), point)  # checks the config
        require(run_id not in seen, f"sweep {name!r}: two axis points give the same run "
                                    f"({run_id}); an axis repeats a value")
        seen.add(run_id)
        runs.append(run)
    require(runs, f"sweep {name!r} expands to no runs")
    scoring = EvalSpec.from_sweep(spec["eval"], Path(path).parent) if "eval" in spec else None
    return Sweep(name, directory, runs, scoring)


def _point_overrides(point: dict) -> list[str]:
    """`key=value` overrides of one axis point (token keys set the steps later)."""
    overrides = []
    for key, value in point.items():
        if key == SEED_KEY:
            overrides += [f"train.seed={json.dumps(value)}", f"data.seed={json.dumps(value)}"]
        elif key not in TOKEN_KEYS:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ----------------------------------------------------------------------------------------------
# Plan.

def run_accounting(run: Run) -> dict:
    """Parameters, tokens, training FLOPs, energy and weight memory of a run, from its config
    alone: the flat results columns of `model.accounting.summarize` (what `bitnet info` and the
    run's summary.json show), plus the run's own settings."""
    config, model = run.config, run.resolved.model
    summary = compute.summarize(model, run.resolved.recipe, config.data.seq_len)
    tokens = config.train.steps * config.train.batch_size * config.data.seq_len
    return {"run": run.run_id, "preset": config.model.preset, "precision": config.precision,
            "d_model": model.d_model, "n_layers": model.n_layers,
            "parametrization": model.parametrization, "tokens": tokens,
            "steps": config.train.steps, **accounting_row(summary, tokens),
            "lr": config.optimizer.lr, "batch_size": config.train.batch_size,
            "seq_len": config.data.seq_len, SEED: config.train.seed,
            DATA_SEED: config.data.seed, AXES: json.dumps(run.overrides, sort_keys=True)}


def plan(sweep: Sweep, flops_per_second: Optional[float] = None) -> list[dict]:
    """One row per run; `est_seconds` from the causal FLOPs at a sustained FLOP/s, if given."""
    rows = []
    for run in sweep.runs:
        row = {**run_accounting(run), "status": run_status(run.run_dir)["status"]}
        if flops_per_second:
            row["est_seconds"] = row["flops_causal"] / flops_per_second
        rows.append(row)
    return rows


def format_plan(sweep: Sweep, rows: list[dict]) -> str:
    header = f"{'run':<36} {'params(non-emb)':>15} {'tokens':>10} {'FLOPs(causal)':>13} " \
             f"{'est. time':>10} {'status':>10}"
    lines = [f"sweep {sweep.name}: {len(rows)} runs in {sweep.directory}", header,
             "-" * len(header)]
    for row in rows:
        est = format_duration(row["est_seconds"]) if "est_seconds" in row else "-"
        lines.append(f"{row['run']:<36} {row['params_non_embedding']:>15,} {row['tokens']:>10.3g} "
                     f"{row['flops_causal']:>13.3e} {est:>10} {row['status']:>10}")
    total = sum(r["flops_causal"] for r in rows)
    est_total = sum(r.get("est_seconds", 0.0) for r in rows)
    lines.append(f"total {total:.3e} FLOPs" + (f", about {format_duration(est_total)} at the measured "
                                              f"rate" if est_total else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Status and launching.

def run_status(run_dir: Path) -> dict:
    """completed | failed | diverged | interrupted | started (checkpoints, no summary) | pending.

    A summary.json that does not read is set aside (the trainer writes a new one when the run
    resumes) and named in `reason`: one damaged run never stops the sweep."""
    summary_path = run_dir / run_files.SUMMARY_FILE
    damaged = None
    if summary_path.exists():
        try:
            summary = read_json_object(summary_path, "run summary")
        except ConfigError as error:
            damaged = str(error)
        else:
            status = summary.get("status", "failed")
            if status == "running":  # a summary written by a crash in the summary itself
                status = "failed"
            return {"status": status, "reason": summary.get("reason"),
                    "error": summary.get("error")}
    if has_checkpoints(run_dir):
        return {"status": "started", "reason": damaged, "error": None}
    return {"status": "pending", "reason": damaged, "error": None}


def has_checkpoints(run_dir: Path) -> bool:
    """True when the run wrote at least one complete checkpoint step (it can resume)."""
    directory = run_dir / run_files.CHECKPOINT_DIR
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit()
                                      for p in directory.iterdir())


# An exception's last line, e.g. "ValueError: ..." or "jax.errors.JaxRuntimeError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def last_error_line(log_path: Path, limit: int = 300) -> Optional[str]:
    """Why a run failed, from its log: the last `error: ...` line our CLI prints, else the last
    exception line of a traceback, else the last line; None without a log."""
    try:
        text = Path(log_path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = (next((l for l in reversed(lines) if l.startswith("error:")), None)
             or next((l for l in reversed(lines) if _EXCEPTION_LINE.match(l)), None)
             or (lines[-1] if lines else None))
    if found is not None and len(found) > limit:
        found = found[:limit - 3] + "..."
    return found


def write_run_config(run: Run) -> Path:
    path = run.run_dir.parent / "_configs" / f"{run.run_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(run.config), sort_keys=False))
    return path


def write_eval_spec(sweep: Sweep) -> Path:
    path = sweep.directory / "_configs" / "lm_eval_spec.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(sweep.eval.to_json(), indent=2))
    return path


def jobs_to_run(sweep: Sweep, retry_failed: bool = False) -> tuple[list[Job], dict[str, str]]:
    """Jobs for every run not finished (failed ones only if `retry_failed`), and for finished
    ones not yet scored on the sweep's lm-eval tasks; skipped ones' status."""
    jobs, skipped = [], {}
    scoring = ["--lm-eval", str(write_eval_spec(sweep).resolve())] if sweep.eval else []
    for run in sweep.runs:
        status = run_status(run.run_dir)["status"]
        unscored = sweep.eval is not None and not scored_with(run.run_dir, sweep.eval)
        if (status in FINISHED and not unscored) or (status in FAILED and not retry_failed):
            skipped[run.run_id] = status
            continue
        if status in FAILED:  # retried from scratch: its checkpoints may hold the bad state
            _archive_failed(run.run_dir)
        # `train` on a finished run only scores it (with --lm-eval).
        argv = [sys.executable, "-m", "bitnet_jax.cli", "train", "--config",
                str(write_run_config(run).resolve())] + scoring
        jobs.append(Job(run.run_id, argv, run.run_dir.resolve()))
    return jobs, skipped


def _archive_failed(run_dir: Path) -> None:
    target = run_dir.with_name(run_dir.name + ".failed")
    index = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.failed{index}")
        index += 1
    run_dir.rename(target)


def record_crashes(jobs: list[Job], results) -> list[dict]:
    """Record how each process that failed ended; returns one {run, status, error} per failure.

    A process that died without a summary (killed, out of memory) is `interrupted` when it left
    a checkpoint (a plain re-run resumes it) and `failed` otherwise. Every failure's summary
    carries the last error line of its launch.log."""
    failures = []
    for job, result in zip(jobs, results):
        if result.returncode == 0:
            continue
        error = last_error_line(result.log_path)
        summary_path = job.run_dir / run_files.SUMMARY_FILE
        status = run_status(job.run_dir)
        if not summary_path.exists() or status["reason"] is not None and status["status"] in (
                "started", "pending"):  # no summary, or one that does not read
            resumable = has_checkpoints(job.run_dir)
            status = {"status": "interrupted" if resumable else "failed",
                      "reason": f"process exited with code {result.returncode}"
                                f"{' after a checkpoint (a re-run resumes it)' if resumable else ''}"
                                f"; see {result.log_path}"}
            job.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(summary_path, json.dumps(
                {"run": job.name, **status, "error": error}, indent=2))
        failures.append({"run": job.name, "status": status["status"],
                         "error": error or status.get("reason")})
    return failures


# ----------------------------------------------------------------------------------------------
# Collect.

def collect_run(run: Run) -> dict:
    """One results row: accounting from the config, metrics from the run directory."""
    from bitnet_jax.train.metrics import read_jsonl

    status = run_status(run.run_dir)
    row = {**run_accounting(run), **status}
    metrics_path = run.run_dir / run_files.METRICS_FILE
    evals = [r for r in read_jsonl(metrics_path) if r.get("kind") == "eval"] \
        if metrics_path.exists() else []
    summary_path = run.run_dir / run_files.SUMMARY_FILE
    damaged = status["status"] in ("started", "pending")  # a summary there did not read
    summary = read_json_object(summary_path, "run summary") \
        if summary_path.exists() and not damaged else {}
    if status["status"] in FAILED + ("interrupted",) and not row.get("error"):
        row["error"] = last_error_line(run.run_dir / run_files.LAUNCH_LOG)
    row.update({
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        "eval_ppl": evals[-1]["eval_ppl"] if evals else None,
        "eval_bpb": evals[-1]["eval_bpb"] if evals else None,
        "wall_seconds": summary.get("wall_seconds"), "tokens_per_s": summary.get("tokens_per_s"),
    })
    if status["status"] != "completed":  # report measured tokens only for finished runs
        row["tokens"] = summary.get("tokens", row["tokens"]) if summary else row["tokens"]
    try:
        scores = read_run_scores(run.run_dir)
    except ConfigError as error:  # damaged scores cost the scores, not the run's row
        scores, row["error"] = None, str(error)
    return {**{column: row.get(column) for column in RESULT_COLUMNS},
            **(score_columns(scores) if scores else {})}


def collect_run_or_error(run: Run) -> dict:
    """`collect_run`, or a row that says why this run's files do not read (the others go on)."""
    try:
        return collect_run(run)
    except ConfigError as error:
        row = {**run_accounting(run), "status": "unreadable", "error": str(error)}
        return {column: row.get(column) for column in RESULT_COLUMNS}


def collect(sweep: Sweep) -> list[dict]:
    """The results table of a sweep, written as results.csv and results.parquet."""
    rows = [collect_run_or_error(run) for run in sweep.runs]
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_table(rows, sweep.directory / "results.csv")
    write_parquet(rows, sweep.directory / "results.parquet")
    return rows


# ----------------------------------------------------------------------------------------------
# Run.

LAUNCHERS = ("local", "slurm", "print")


def run_sweep(sweep: Sweep, launcher: str = "local", workers: int = 1,
              retry_failed: bool = False, sbatch_options: Optional[dict] = None,
              wait: bool = False) -> dict:
    """Launch every run that is not finished. Returns what was launched and skipped."""
    from bitnet_jax.scaling import launch

    require(launcher in LAUNCHERS, f"--launcher {launcher!r}; choose one of {LAUNCHERS}")
    jobs, skipped = jobs_to_run(sweep, retry_failed)
    outcome = {"launched": [j.name for j in jobs], "skipped": skipped, "results": [],
               "failures": []}
    if not jobs:
        return outcome
    if launcher == "print":
        outcome["commands"] = launch.launch_print(jobs)
    elif launcher == "slurm":
        outcome["slurm"] = launch.launch_slurm(jobs, sweep.directory, sbatch_options, wait=wait)
    else:
        results = launch.launch_local(jobs, workers=workers)
        outcome["failures"] = record_crashes(jobs, results)
        outcome["results"] = results
    return outcome
