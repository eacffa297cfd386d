"""Downstream scores in a sweep: which lm-eval tasks to score, the score columns, their fits.

A sweep file may name lm-evaluation-harness tasks:

    eval:
      tasks: [arc_easy, hellaswag]   # lm-eval registry names, or tasks in include_path
      include_path: my_tasks/        # optional: a directory of task YAML (relative to the file)
      limit: 200                     # optional: documents per task (a fraction if < 1)
      num_fewshot: 0                 # optional
      batch_size: 8                  # optional

Each run is then scored after it trains, in its own job (`bitnet train --lm-eval SPEC`), and
writes `lm_eval.json` in its run directory (the spec beside lm-eval's results, so a changed spec
rescores the run on the next `sweep run`). `score_columns` flattens those results into the
results table's `eval/<task>/<metric>` columns; `downstream_fits` relates each score to the
loss and to N per recipe (a line in loss with a bootstrap interval of its slope, and Spearman's
rank correlation with N), for fits.json's "downstream" entry and the report. No JAX and no
lm-eval here: the scoring itself is `interop.lm_eval_adapter.score_run`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bitnet_jax import run_files
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.files import read_json_object
from bitnet_jax.scaling.results import (COMPLETED, LOSS, PARAMS, RECIPE, SCORE_PREFIX, STATUS,
                                        TOKENS)

__all__ = ["EvalSpec", "SCORE_PREFIX", "score_columns", "read_run_scores", "scored_with",
           "score_columns_of", "fit_score_against_loss", "downstream_fits"]

DOWNSTREAM_N_BOOT = 1000


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """The lm-eval tasks a sweep scores every run on, and how."""

    tasks: tuple[str, ...]
    include_path: Optional[str] = None  # absolute once read from a sweep file
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8

    @classmethod
    def from_sweep(cls, value: Any, sweep_dir: Path) -> "EvalSpec":
        """The sweep file's `eval:` block, checked; include_path is read relative to the file."""
        require(isinstance(value, dict), f"sweep eval: expected a mapping with tasks: [...], "
                                         f"got {value!r}")
        keys = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(keys))
        require(not unknown, f"sweep eval: unknown key(s) {unknown}; known: {keys}")
        tasks = value.get("tasks")
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",")]
        require(isinstance(tasks, list) and tasks and all(isinstance(t, str) and t.strip()
                                                          for t in tasks),
                f"sweep eval.tasks: give a list of lm-eval task names, got {tasks!r}")
        include = value.get("include_path")
        if include is not None:
            path = (sweep_dir / str(include)).resolve()
            require(path.is_dir(), f"sweep eval.include_path {str(include)!r}: no directory "
                                   f"{path}; give a directory of lm-eval task YAML files")
            include = str(path)
        limit = value.get("limit")
        require(limit is None or (_is_number(limit) and limit > 0),
                f"sweep eval.limit={limit!r}: give a positive number of documents per task "
                f"(or a fraction below 1)")
        shots = value.get("num_fewshot")
        require(shots is None or (isinstance(shots, int) and not isinstance(shots, bool)
                                  and shots >= 0),
                f"sweep eval.num_fewshot={shots!r}: give a whole number >= 0")
        batch = value.get("batch_size", 8)
        require(isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1,
                f"sweep eval.batch_size={batch!r}: give a whole number >= 1")
        if limit is not None and limit >= 1:
            limit = int(limit)
        return cls(tuple(t.strip() for t in tasks), include, limit, shots, batch)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "tasks": list(self.tasks)}

    @classmethod
    def from_json(cls, value: dict) -> "EvalSpec":
        return cls(**{**value, "tasks": tuple(value["tasks"])})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# Scores of one run.

def score_columns(results: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": 0.5, "acc_stderr,none": ...}}} as
    {"eval/task/acc": 0.5}: one column per numeric metric, standard errors left out; a metric
    under a filter other than lm-eval's "none" keeps it (`eval/task/exact_match/strict-match`)."""
    columns = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not _is_number(value) or metric.endswith("_stderr") or metric == "alias":
                continue
            name = f"{SCORE_PREFIX}{task}/{metric}"
            columns[name if filter_name in ("", "none") else f"{name}/{filter_name}"] = \
                float(value)
    return columns


def read_run_scores(run_dir: Path) -> Optional[dict]:
    """The run's lm_eval.json ({"spec": ..., "results": ...}), or None when it has none."""
    path = Path(run_dir) / run_files.LM_EVAL_FILE
    return read_json_object(path, "lm-eval scores") if path.is_file() else None


def scored_with(run_dir: Path, spec: EvalSpec) -> bool:
    """Whether the run holds scores of exactly this spec (a damaged file counts as none)."""
    try:
        scores = read_run_scores(run_dir)
    except ConfigError:
        return False
    return scores is not None and scores.get("spec") == spec.to_json()


# ----------------------------------------------------------------------------------------------
# Scores against loss and size.

def score_columns_of(rows: list[dict]) -> list[str]:
    """The score columns with at least one number in `rows`, sorted."""
    return sorted({key for row in rows for key, value in row.items()
                   if key.startswith(SCORE_PREFIX) and _is_number(value)})


def fit_score_against_loss(loss: np.ndarray, score: np.ndarray, n_boot: int = DOWNSTREAM_N_BOOT,
                           seed: int = 0) -> Optional[dict]:
    """score = intercept + slope * loss by least squares, with the 95% percentile interval of
    the slope over `n_boot` resamples of the runs; None with fewer than 3 distinct losses.

    A line, not OLMo's sigmoid: small ladders sit on one short stretch of the curve, where a
    sigmoid's four constants are not identified. Resamples with one distinct loss are skipped."""
    loss, score = np.asarray(loss, float), np.asarray(score, float)
    if len(np.unique(loss)) < 3:
        return None
    slope, intercept = np.polyfit(loss, score, 1)
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(n_boot):
        index = rng.integers(0, len(loss), len(loss))
        if len(np.unique(loss[index])) >= 2:
            slopes.append(np.polyfit(loss[index], score[index], 1)[0])
    low, high = np.percentile(slopes, [2.5, 97.5])
    return {"slope": float(slope), "intercept": float(intercept),
            "slope_interval": [float(low), float(high)], "n_boot": len(slopes),
            "n_points": int(len(loss))}


def _spearman(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    from scipy.stats import spearmanr

    if len(np.unique(x)) < 2 or len(np.unique(y)) < 2:
        return None  # a constant has no rank order
    return float(spearmanr(x, y).statistic)


def downstream_fits(rows: list[dict], n_boot: int = DOWNSTREAM_N_BOOT) -> dict[str, dict]:
    """Per score column and recipe: its runs' (N, D, loss, score), the line of score in loss
    and the rank correlation of score with N, over the completed runs that have the score."""
    fits: dict[str, dict] = {}
    for column in score_columns_of(rows):
        per_recipe: dict[str, dict] = {}
        scored = [r for r in rows if r.get(STATUS) == COMPLETED and _is_number(r.get(column))
                  and _is_number(r.get(LOSS))]
        for recipe in sorted({r[RECIPE] for r in scored}):
            runs = sorted((r for r in scored if r[RECIPE] == recipe), key=lambda r: r[PARAMS])
            n, loss, score = (np.array([float(r[key]) for r in runs])
                              for key in (PARAMS, LOSS, column))
            per_recipe[recipe] = {
                "points": [{"N": r[PARAMS], "D": r.get(TOKENS), "loss": r[LOSS],
                            "score": r[column], "run": r.get("run")} for r in runs],
                "against_loss": fit_score_against_loss(loss, score, n_boot),
                "spearman_with_N": _spearman(n, score),
            }
        fits[column] = per_recipe
    return fits
