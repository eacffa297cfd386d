"""Hyperparameter selection: the best run over the hyperparameter axes per size (the envelope).

A sweep may sweep any key (`optimizer.lr`, `optimizer.weight_decay`, ...) besides the size, the
tokens, the precision and the seed. A law is fitted to the best run per (recipe, N, D, seed): the
envelope over the hyperparameters, as in OLMo's and Marin's ladders. `select_envelope` keeps those
runs, says which values won, and flags a winner at the edge of its grid (its optimum was not
bracketed: a wider grid may still lower the loss). Pure Python and numpy: it works from the
results table alone (the `axes` column, or columns such as `lr` for a table from elsewhere).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.results import AXES, DATA_SEED, KEY_COLUMNS, SEED

__all__ = ["ROLE_KEYS", "SELECT_BY", "Choice", "Selection", "axis_values",
           "default_hyperparameters", "hyperparameter_value", "select_envelope"]

# How the envelope picks a setting where sizes have seeds: the best per seed (each seed's own
# winner), or the best mean over the seeds (one winner per size, every seed kept at it: the
# winner is not the luckiest of a few noisy runs, so the kept losses keep their seed noise).
SELECT_BY = ("seed", "mean")

# Sweep keys that say which point a run measures, not how it was tuned: never selected over.
# The model's shape, set as `model.d_model` (or any `model.overrides.*` key): size, not tuning.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
                "tie_embeddings")
SIZE_KEYS = ("model.preset",) + tuple(f"model.{field}" for field in SHAPE_FIELDS)
TOKEN_KEYS = ("tokens", "tokens_per_param", "train.steps")
RECIPE_KEYS = ("precision",)
SEED_KEYS = ("seed", "train.seed", "data.seed")
ROLE_KEYS = SIZE_KEYS + TOKEN_KEYS + RECIPE_KEYS + SEED_KEYS


def _is_role(key: str) -> bool:
    return key in ROLE_KEYS or key.startswith("model.overrides.")


def axis_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep axes' values of a run (its `axes` JSON cell); {} when the table has none."""
    cell = row.get(AXES)
    if not cell:
        return {}
    if isinstance(cell, Mapping):
        return dict(cell)
    try:
        values = json.loads(cell)
    except (TypeError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def default_hyperparameters(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The swept keys that are not size, tokens, precision or seed, in the order first seen."""
    keys: dict[str, None] = {}
    for row in rows:
        for key in axis_values(row):
            if not _is_role(key):
                keys[key] = None
    return tuple(keys)


def hyperparameter_value(row: Mapping[str, Any], key: str) -> Any:
    """A run's value of a swept key: from its `axes`, else the column of that name or alias."""
    axes = axis_values(row)
    if key in axes:
        return axes[key]
    if key in row:
        return row[key]
    return row.get(KEY_COLUMNS.get(key, key))


def replicate_of(row: Mapping[str, Any]) -> tuple[Any, Any]:
    """The replicate a run belongs to: its (model, data) seeds, None where the table has none."""
    axes = axis_values(row)
    seed = axes.get("seed", axes.get("train.seed", row.get(SEED)))
    return seed, axes.get("seed", axes.get("data.seed", row.get(DATA_SEED)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Choice:
    """The selection at one (recipe, N, D, seed): every setting tried with its loss (the mean of
    its runs), the winner, and the hyperparameters whose winning value is the smallest or
    largest tried (`edges`: the optimum was not bracketed)."""

    recipe: str
    N: float
    D: Optional[float]
    seed: Any
    tried: tuple[tuple[tuple[Any, ...], float], ...]  # (values in `keys` order, loss)
    keys: tuple[str, ...]
    winner: tuple[Any, ...]
    loss: float
    edges: tuple[str, ...]

    @property
    def winner_dict(self) -> dict[str, Any]:
        return dict(zip(self.keys, self.winner))

    def grid(self, key: str) -> list[Any]:
        i = self.keys.index(key)
        return sorted({values[i] for values, _ in self.tried}, key=_sort_key)

    def warning(self) -> Optional[str]:
        """One line for a winner at the edge of its grid, None when every optimum is bracketed."""
        if not self.edges:
            return None
        where = f"N = {self.N:.4g}" + (f", D = {self.D:.4g}" if self.D is not None else "") \
            + (f", seed {self.seed}" if self.seed is not None else "")
        parts = []
        for key in self.edges:
            grid = self.grid(key)
            side = "smallest" if self.winner_dict[key] == grid[0] else "largest"
            parts.append(f"{key} = {self.winner_dict[key]:g} is the {side} of "
                         f"[{', '.join(f'{v:g}' for v in grid)}]")
        return (f"optimum not bracketed at {where}: " + "; ".join(parts)
                + " (widen the grid)")


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


@dataclass(frozen=True)
class Selection:
    """The envelope: the runs kept (`rows`), the `choices` made, and the keys selected over."""

    hyperparameters: tuple[str, ...]
    rows: list[dict]
    choices: tuple[Choice, ...]

    def warnings(self, recipe: str) -> list[str]:
        return [w for c in self.choices if c.recipe == recipe and (w := c.warning())]


def _edges(keys: Sequence[str], tried: Sequence[tuple[tuple[Any, ...], float]],
           winner: tuple[Any, ...]) -> tuple[str, ...]:
    """Keys whose winning value is the smallest or largest numeric value tried."""
    edges = []
    for i, key in enumerate(keys):
        values = sorted({v[i] for v, _ in tried if _is_number(v[i])})
        if len(values) >= 2 and _is_number(winner[i]) and winner[i] in (values[0], values[-1]):
            edges.append(key)
    return tuple(edges)


def select_envelope(rows: Sequence[Mapping[str, Any]], *, n_column: str, loss_column: str,
                    recipe_of: Callable[[Mapping[str, Any]], str],
                    d_column: Optional[str] = None,
                    hyperparameters: Optional[Sequence[str]] = None,
                    select_by: str = "seed") -> Selection:
    """Keep the best setting of the hyperparameters per (recipe, N, D, seed), or with
    `select_by="mean"` per (recipe, N, D) by the mean loss over the seeds (see `SELECT_BY`).

    `rows` are finished runs with valid N, D and loss. `hyperparameters` default to the swept
    keys that are not size, tokens, precision or seed (`default_hyperparameters`). Runs with the
    same setting at one point are replicates (no seed column): they stay together and their mean
    loss ranks the setting. Keys with one value at every point are not selected over; where
    nothing was, every run is kept as it is.
    """
    if select_by not in SELECT_BY:
        raise ConfigError(f"select_by={select_by!r}; choose one of {SELECT_BY}")
    keys = tuple(default_hyperparameters(rows) if hyperparameters is None else hyperparameters)
    by_point: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        d = float(row[d_column]) if d_column else None
        replicate = replicate_of(row) if select_by == "seed" else (None, None)
        by_point[(recipe_of(row), float(row[n_column]), d, replicate)].append(row)
    # A key swept only across points (e.g. an LR zipped with the precision) selects nothing.
    keys = tuple(k for k in keys if any(
        len({json.dumps(hyperparameter_value(r, k), sort_keys=True) for r in group}) > 1
        for group in by_point.values()))
    points: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for point, group in by_point.items():
        for row in group:
            points[point][tuple(hyperparameter_value(row, k) for k in keys)].append(row)
    kept, choices = [], []
    for (recipe, n, d, replicate), settings in points.items():
        tried = tuple((setting, sum(float(r[loss_column]) for r in runs) / len(runs))
                      for setting, runs in settings.items())
        winner, loss = min(tried, key=lambda t: t[1])
        kept += [dict(r) for r in settings[winner]]
        if keys:
            choices.append(Choice(recipe, n, d, replicate[0], tried, keys, winner, loss,
                                  _edges(keys, tried, winner)))
    return Selection(keys, kept, tuple(choices))
