"""Compute-optimal precision: the best (N, D, P) per budget under a fitted precision law.

Three costs, each a budget to spend:
- `compute`: training FLOPs scaled by bits as Kumar et al., C = 6 N D P / 16 (bf16-equivalent
  FLOPs; P the training precision, the wider of the weight and activation bits, since the matmul
  runs at its wider operand); N and D both free.
- `memory`: weight memory N P_w / 8 bytes at a given token count D; N free.
- `energy`: inference energy per token, N times the energy of one multiply-accumulate at
  (P_w, P_a) from `model.accounting.matmul_energy` (BitNet's model, 7nm), at a given D; N free.

For every budget and every candidate precision the loss is minimised over N on a fine log grid
(vectorised; the law is smooth and one-dimensional in log N), and the precision with the lowest
loss wins. numpy only, plus the energy table of `model.accounting` (imported when an energy is
asked for, so the fits load without JAX).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.precision_laws import LOG2_3, UNQUANTIZED, _eval_precision

__all__ = ["COSTS", "CANDIDATE_BITS", "Optimum", "mac_energy_pj", "optimal_precision",
           "format_optima"]

COSTS = ("compute", "memory", "energy")
# Candidate precisions: weights and activations (and the KV cache, where the law has a gamma for
# it) all at P bits, as Kumar et al.'s training precision.
CANDIDATE_BITS = (1.0, LOG2_3, 2.0, 3.0, 4.0, 6.0, 8.0, UNQUANTIZED)


def mac_energy_pj(weight_bits: float, act_bits: float, node: str = "7nm") -> float:
    """Energy of one multiply-accumulate at these bits (a large matmul's energy per MAC)."""
    # Imported here: model.accounting loads the recipes (and JAX), the fits must load without.
    from bitnet_jax.model.accounting import matmul_energy

    n = 4096
    return matmul_energy(1, n, n, weight_bits, act_bits, node).total_pj / (n * n)


@dataclass(frozen=True)
class Optimum:
    """The best point of one budget under one cost: precision (bits), N, D, the predicted loss,
    and the loss of the best 16-bit point at the same budget."""

    cost: str
    budget: float
    weight_bits: float
    act_bits: float
    N: float
    D: float
    loss: float
    loss_16bit: float


def _setting(bits: float, law: Mapping[str, float]) -> tuple[float, float, float]:
    kv = bits if "gamma_kv" in law else UNQUANTIZED
    return bits, bits, kv


def _best_over_n(law: Mapping[str, float], bits: tuple[float, float, float], n: np.ndarray,
                 d: np.ndarray) -> tuple[float, float, float]:
    loss = _eval_precision(law, n, d, *bits)
    i = int(np.nanargmin(loss))
    return float(loss[i]), float(n[i]), float(d[i])


def optimal_precision(law: Mapping[str, float], budgets: Sequence[float], cost: str = "compute",
                      *, tokens: Optional[float] = None,
                      candidates: Sequence[float] = CANDIDATE_BITS,
                      n_range: tuple[float, float] = (1e3, 1e13)) -> list[Optimum]:
    """The best precision, N and D per budget (see the module docstring for the costs): FLOPs
    for `compute`, bytes for `memory`, joules per token for `energy` (the last two at `tokens`
    training tokens). `law` holds a precision law's parameters (fits.json's)."""
    if cost not in COSTS:
        raise ConfigError(f"cost {cost!r}: choose one of {', '.join(COSTS)}")
    if cost != "compute" and not (tokens and tokens > 0):
        raise ConfigError(f"the {cost} cost needs the training tokens D (tokens=...)")
    n_grid = np.geomspace(*n_range, 2000)
    out = []
    for budget in budgets:
        best, best16 = None, math.inf
        for p in candidates:
            bits = _setting(p, law)
            train_bits = max(bits[0], bits[1])
            if cost == "compute":
                n = n_grid
                d = budget / (6 * n * train_bits / UNQUANTIZED)
            elif cost == "memory":
                n = np.array([8 * budget / bits[0]])
                d = np.array([tokens])
            else:
                n = np.array([budget * 1e12 / mac_energy_pj(bits[0], bits[1])])
                d = np.array([tokens])
            loss, n_best, d_best = _best_over_n(law, bits, n, d)
            if p >= UNQUANTIZED:
                best16 = loss
            if best is None or loss < best[0]:
                best = (loss, p, n_best, d_best, bits)
        loss, p, n_best, d_best, bits = best
        out.append(Optimum(cost, float(budget), bits[0], bits[1], n_best, d_best, loss, best16))
    return out


def format_optima(optima: Sequence[Optimum]) -> list[str]:
    """A markdown table of the optima."""
    unit = {"compute": "FLOPs", "memory": "bytes", "energy": "J / token"}
    lines = ["| cost | budget | best bits (w / a) | N | D | loss | 16-bit loss |",
             "|---|---|---|---|---|---|---|"]
    for o in optima:
        lines.append(f"| {o.cost} | {o.budget:.3g} {unit[o.cost]} | {_bits(o.weight_bits)} / "
                     f"{_bits(o.act_bits)} | {o.N:.3g} | {o.D:.3g} | {o.loss:.4f} "
                     f"| {o.loss_16bit:.4f} |")
    return lines


def _bits(p: float) -> str:
    return "1.58" if abs(p - LOG2_3) < 1e-6 else f"{p:g}"


def draw_optima(ax, law: Mapping[str, Any], budgets: Sequence[float], cost: str,
                tokens: Optional[float] = None) -> None:
    """Loss at the best N per budget minus that of 16 bits, one line per candidate precision
    (the curves of a law differ by little beside the fall of the loss with the budget), the
    winner starred."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    ref = np.array([o.loss for o in optimal_precision(law, budgets, cost, tokens=tokens,
                                                      candidates=(UNQUANTIZED,))])
    for i, p in enumerate(CANDIDATE_BITS):
        optima = optimal_precision(law, budgets, cost, tokens=tokens, candidates=(p,))
        ax.plot(budgets, [o.loss for o in optima] - ref,
                color=cmap(i / (len(CANDIDATE_BITS) - 1)), lw=1.2, label=f"{_bits(p)} bits")
    best = optimal_precision(law, budgets, cost, tokens=tokens)
    ax.plot([o.budget for o in best], [o.loss for o in best] - ref, "r*", ms=9, label="best")
    ax.set_xscale("log")
    ax.set_xlabel({"compute": "training FLOPs (6 N D P / 16)", "memory": "weight memory (bytes)",
                   "energy": "inference energy per token (J)"}[cost])
    ax.set_ylabel("predicted loss - 16-bit loss at the same budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
