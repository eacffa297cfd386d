"""The results table: one row per run, its column names, its reader and its writers.

A sweep writes `results.csv` and `results.parquet` with `RESULT_COLUMNS`; `bitnet fit` reads any
CSV whose columns carry the names below (the sweep's, or a common alias from another framework).
The accounting columns are a flat view of `model.accounting.summarize`, so a number in the table
is the number `bitnet info` and a run's summary.json show. No JAX here: only the csv module and,
for parquet, pyarrow.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from bitnet_jax.errors import ConfigError
from bitnet_jax.files import read_text

__all__ = ["RESULT_COLUMNS", "PARAMS", "TOKENS", "LOSS", "RECIPE", "STATUS", "COMPLETED",
           "SEED", "DATA_SEED", "AXES", "KEY_COLUMNS", "BIT_COLUMNS", "WEIGHT_BITS", "ACT_BITS",
           "KV_BITS", "GROUP_SIZE", "WEIGHT_GRANULARITY", "UNQUANTIZED_BITS", "precision_row",
           "PARAM_COLUMNS", "TOKEN_COLUMNS", "LOSS_COLUMNS", "RECIPE_COLUMNS", "SCORE_PREFIX",
           "accounting_row", "read_table", "table_columns", "write_table", "write_parquet"]

RESULT_COLUMNS = (
    "run", "status", "reason", "preset", "precision",
    "d_model", "n_layers", "parametrization",  # the shape and parametrization (muP) of the model
    "params_total", "params_non_embedding",
    "params_embedding", "params_quantized_linear", "tokens", "steps", "flops_kaplan",
    "flops_full", "flops_causal", "energy_per_token_7nm_j", "energy_per_token_45nm_j",
    "weight_memory_bytes", "weight_memory_format", "weight_memory_vs_bf16",
    "weight_bits", "act_bits", "kv_bits", "group_size", "weight_granularity",
    "final_eval_loss", "best_eval_loss", "eval_ppl", "eval_bpb", "wall_seconds",
    "tokens_per_s", "lr", "batch_size", "seq_len", "seed", "data_seed", "axes",
    "error",  # a failed run's last error line (from its launch.log)
)

# Downstream scores: one column per lm-eval task and metric a sweep scored (`scaling.downstream`).
SCORE_PREFIX = "eval/"

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

# The precision of a run, from its recipe (`precision_row`): bits of the linear weights, of their
# inputs and of the KV cache (16 = not quantized; ternary 1.58), the weights' scale granularity
# and group size. The precision laws (`precision_laws`) read these names in any CSV.
WEIGHT_BITS, ACT_BITS, KV_BITS = "weight_bits", "act_bits", "kv_bits"
GROUP_SIZE, WEIGHT_GRANULARITY = "group_size", "weight_granularity"
BIT_COLUMNS = (WEIGHT_BITS, ACT_BITS, KV_BITS, GROUP_SIZE, WEIGHT_GRANULARITY)
UNQUANTIZED_BITS = 16

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
        **precision_row(summary),
    }


def precision_row(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The bit columns of a run, read off `model.accounting.summarize` (its recipe's roles).

    A recipe whose linear roles differ (a4.8: 4-bit inputs to q/k/v and gate/up, 8-bit to the
    others) gets the mean over roles weighted by their parameters (the share of the matmuls each
    does); uniform recipes (b1.58, every `w{W}a{A}`) get their bits exactly. `group_size` is the
    number of input features that share one weight scale: N for `@g{N}`; for per-channel and
    per-tensor scales the model width d_model (the inputs of q/k/v and gate/up, which hold most
    weights), Chen et al.'s convention of G = in_features; empty for unquantized weights.
    """
    roles = summary["precision"]["roles"]
    weights = summary["params"]["linear_by_role"]
    total = sum(weights[r] for r in roles) or 1

    def mean(key: str) -> float:
        return round(sum(weights[r] * roles[r][key] for r in roles) / total, 4)

    kinds = {roles[r].get("weight_granularity") for r in roles} - {None}
    granularity = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)
    groups = {roles[r].get("weight_group_size") for r in roles} - {None}
    group = groups.pop() if len(groups) == 1 else None
    if group is None and granularity in ("channel", "tensor"):
        group = summary["config"]["d_model"]
    kv = summary["precision"]["kv_cache_bits"]
    return {WEIGHT_BITS: mean("weight_bits"), ACT_BITS: mean("activation_bits"),
            KV_BITS: UNQUANTIZED_BITS if kv is None else kv, GROUP_SIZE: group,
            WEIGHT_GRANULARITY: granularity}


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
    text = read_text(path, "results table")  # binary or non-UTF-8: one line naming it
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = [{k: _parse(v) for k, v in row.items()} for row in reader]
    except csv.Error as error:
        raise ConfigError(f"results table {path}:{reader.line_num}: not valid CSV ({error}); "
                          f"repair the file") from None
    if any(None in row for row in rows):
        line = next(i for i, row in enumerate(rows) if None in row) + 2
        raise ConfigError(f"results table {path}:{line}: more cells than the header has "
                          f"columns; repair the file")
    if not rows:
        raise ConfigError(f"results table {str(path)!r} has no rows")
    return rows


def table_columns(rows: list[dict]) -> list[str]:
    """RESULT_COLUMNS, then the downstream score columns any row has (`eval/<task>/<metric>`,
    one per lm-eval metric a sweep scored), sorted."""
    scores = sorted({key for row in rows for key in row if key.startswith(SCORE_PREFIX)})
    return list(RESULT_COLUMNS) + scores


def write_table(rows: list[dict], path: Path) -> None:
    """`rows` as a CSV with the `table_columns` header (missing values as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=table_columns(rows))
        writer.writeheader()
        writer.writerows(rows)


def write_parquet(rows: list[dict], path: Path) -> None:
    """`rows` as a parquet file with the `table_columns` (pyarrow infers the column types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {c: [r.get(c) for r in rows] for c in table_columns(rows)}
    pq.write_table(pa.table(columns), path)
