"""The results table: one row per run, its column names, its reader and its writers.

A sweep writes `results.csv` and `results.parquet` with `RESULT_COLUMNS`; `bitnet fit` reads any
CSV whose columns carry the names below (the sweep's, or a common alias from another framework).
The accounting columns are a flat view of `model.accounting.summarize`, so a number in the table
is the number `bitnet info` and a run's summary.json show. No JAX here: only the csv module and,
for parquet, pyarrow.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from bitnet_jax.errors import ConfigError

__all__ = ["RESULT_COLUMNS", "PARAMS", "TOKENS", "LOSS", "RECIPE", "STATUS", "COMPLETED",
           "SEED", "DATA_SEED", "AXES", "KEY_COLUMNS",
           "PARAM_COLUMNS", "TOKEN_COLUMNS", "LOSS_COLUMNS", "RECIPE_COLUMNS", "accounting_row",
           "read_table", "write_table", "write_parquet"]

RESULT_COLUMNS = (
    "run", "status", "reason", "preset", "precision", "params_total", "params_non_embedding",
    "params_embedding", "params_quantized_linear", "tokens", "steps", "flops_kaplan",
    "flops_full", "flops_causal", "energy_per_token_7nm_j", "energy_per_token_45nm_j",
    "weight_memory_bytes", "weight_memory_format", "weight_memory_vs_bf16",
    "final_eval_loss", "best_eval_loss", "eval_ppl", "eval_bpb", "wall_seconds",
    "tokens_per_s", "lr", "batch_size", "seq_len", "seed", "data_seed", "axes",
)

# The columns the fits read, by their role.
PARAMS = "params_non_embedding"  # N
TOKENS = "tokens"  # D
LOSS = "final_eval_loss"  # L, the final validation loss in nats per token
RECIPE = "precision"  # the recipe of a run
STATUS, COMPLETED = "status", "completed"  # rows of runs that did not finish are not fitted
SEED, DATA_SEED = "seed", "data_seed"  # model init (train.seed) and data order (data.seed)
# The sweep axes' values of a run, as a JSON object ({"optimizer.lr": 0.003, "seed": 1, ...}):
# the generic record from which `select` finds the hyperparameters of any swept key.
AXES = "axes"
# Columns that hold a sweep key's value, for tables written without an `axes` column.
KEY_COLUMNS = {"optimizer.lr": "lr", "train.batch_size": "batch_size",
               "data.seq_len": "seq_len", "train.seed": SEED, "data.seed": DATA_SEED}

# Names `bitnet fit` accepts for them in a table from elsewhere, the sweep's first.
PARAM_COLUMNS = (PARAMS, "params", "n_params", "N")
TOKEN_COLUMNS = (TOKENS, "train_tokens", "D")
LOSS_COLUMNS = (LOSS, "eval_loss", "loss")
RECIPE_COLUMNS = ("recipe", RECIPE)


def accounting_row(summary: Mapping[str, Any], tokens: float) -> dict[str, Any]:
    """The accounting columns of a run trained on `tokens` tokens, read off the dict of
    `model.accounting.summarize` (training FLOPs = tokens x FLOPs per token, per convention)."""
    params, memory = summary["params"], summary["memory"]
    return {
        "params_total": params["total"], "params_non_embedding": params["non_embedding"],
        "params_embedding": params["embedding"],
        "params_quantized_linear": params["quantized_linear"],
        **{f"flops_{convention}": float(tokens) * per_token
           for convention, per_token in summary["flops_per_token"].items()},
        **{f"energy_per_token_{node}_j": energy["total_j"]
           for node, energy in summary["energy_per_token"].items()},
        "weight_memory_bytes": memory["total_bytes"],
        "weight_memory_format": memory["default_format"],
        "weight_memory_vs_bf16": memory["vs_bf16"],
    }


def _parse(value: Optional[str]) -> Any:
    """A CSV cell: None when empty, an int or float when it reads as one, else the text."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value \
        else number


def read_table(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Rows of a results CSV (any header line) with numbers parsed and empty cells as None."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results table {str(path)!r} not found")
    with path.open(newline="") as f:
        rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        raise ConfigError(f"results table {str(path)!r} has no rows")
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    """`rows` as a CSV with the RESULT_COLUMNS header (missing values as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def write_parquet(rows: list[dict], path: Path) -> None:
    """`rows` as a parquet file with the RESULT_COLUMNS (pyarrow infers the column types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: [r.get(c) for r in rows] for c in RESULT_COLUMNS}
    pq.write_table(pa.table(columns), path)
