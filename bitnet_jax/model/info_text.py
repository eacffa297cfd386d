"""The text tables of `bitnet info`: a preset's accounting (`model.accounting.summarize`) and the
list of presets and recipes, as aligned columns."""

from __future__ import annotations

from typing import Sequence

from bitnet_jax.model import accounting as compute
from bitnet_jax.units import format_bytes, format_count, format_energy

__all__ = ["aligned_rows", "format_summary", "list_presets"]


def aligned_rows(rows: Sequence[tuple[str, ...]], align: str = "lrrr",
                 indent: str = "  ") -> list[str]:
    """Aligned columns: `align[i]` is "l" or "r" for column i (labels left, numbers right)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i])
                 for i, c in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def format_summary(name: str, summary: dict) -> str:
    """The `bitnet info` table for the dict of `compute.summarize` (plus the preset's name)."""
    cfg, prec, params = summary["config"], summary["precision"], summary["params"]
    lines = [f"model {name}  precision {prec['name']}  seq_len {summary['seq_len']}"]
    if prec["description"]:
        lines.append(f"  {prec['description']}")

    lines.append("\nshape")
    lines += aligned_rows([
        ("vocab / d_model / layers", f"{cfg['vocab_size']} / {cfg['d_model']} / {cfg['n_layers']}"),
        ("heads / kv heads / head_dim", f"{cfg['n_heads']} / {cfg['n_kv_heads']} / {cfg['head_dim']}"),
        ("d_ff / activation", f"{cfg['d_ff']} / {cfg['ffn_activation']}"),
        ("norms / tied embeddings", f"{cfg['norm_placement']} / {cfg['tie_embeddings']}"),
    ], align="ll")

    lines.append("\nparameters")
    counted = (("embedding (+ untied head)", "embedding"), ("non-embedding", "non_embedding"),
               ("  linear", "linear"), ("  norm", "norm"), ("quantized linear", "quantized_linear"),
               ("total", "total"))
    lines += aligned_rows([(label, format_count(params[key]), f"{params[key]:,}")
                           for label, key in counted])

    lines.append("\ntraining FLOPs per token")
    lines += aligned_rows([(conv, f"{flops:.4e}", summary["flop_conventions"][conv])
                    for conv, flops in summary["flops_per_token"].items()], align="lrl")

    energy = summary["energy_per_token"]
    nodes = list(energy)
    lines.append(f"\ninference energy per token (context {energy[nodes[0]]['context_len']})")
    parts = [(f"linear {role} ({r['arithmetic']})", lambda e, role=role: e["linear"][role])
             for role, r in prec["roles"].items()]
    parts += [("head (fp16)", lambda e: e["head"]), ("attention (fp16)", lambda e: e["attention"]),
              ("total", lambda e: e["total"])]
    lines += aligned_rows([("", *nodes)] + [
        (label, *(format_energy(get(energy[n])["total_pj"]) for n in nodes))
        for label, get in parts])
    lines.append("  matmul energy ratio FP16 MAC / INT8 add: " + ", ".join(
        f"{r:.1f}x at {n}" for n, r in summary["matmul_energy_ratio"].items()))

    mem = summary["memory"]
    lines.append("\nweight memory (inference)")
    rows = [(f"linear at {fmt}", format_bytes(b), f"{b / mem['linear_bf16_bytes']:.3f}x bf16")
            for fmt, b in mem["linear_bytes"].items()]
    rows += [("embedding + head (16-bit)", format_bytes(mem["embedding_bytes"])),
             ("norms (16-bit)", format_bytes(mem["norm_bytes"])),
             ("scales (float32)", format_bytes(mem["scale_bytes"])),
             (f"total at {mem['default_format']}", format_bytes(mem["total_bytes"]),
              f"{mem['vs_bf16']:.3f}x bf16"),
             ("bf16 model", format_bytes(mem["bf16_bytes"]))]
    lines += aligned_rows(rows)
    return "\n".join(lines)


def list_presets() -> str:
    from bitnet_jax.model.transformer import PRESETS
    from bitnet_jax.core.precision import PRESETS as RECIPES
    from bitnet_jax.core.precision import recipe_names

    rows = [(name, format_count(compute.param_counts(cfg).total),
             f"d={cfg.d_model} L={cfg.n_layers} H={cfg.n_heads} {cfg.norm_placement}")
            for name, cfg in PRESETS.items()]
    lines = ["model presets (total parameters)"] + aligned_rows(rows, align="lrl")
    lines.append("\nprecision recipes")
    lines += aligned_rows([(name, r.description) for name, r in RECIPES.items()], align="ll")
    lines += ["  also: " + ", ".join(recipe_names()[len(RECIPES):])]
    return "\n".join(lines)
