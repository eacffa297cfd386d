"""Benchmark KV-cache decoding of a ternary model against bf16, in one run on one machine.

For one preset (default: the BitNet b1.58 2B4T shape), builds random weights directly in each
storage format (no float master copy, so a 2B model fits in a few GB) and measures decode
tokens/s and weight memory at each batch size for:
  bf16          bf16 weights, bf16 compute with float32 accumulation (the baseline);
  ternary-int8  b1.58 weights held as int8 codes, int8 activations, int32 accumulation;
  ternary-2bit  b1.58 weights held 2-bit packed (HF layout), unpacked on the fly, int8 products.
Ratios are taken within the run, since the machines are shared and noisy. Prints a table and
writes JSON (default `bench_infer.json`).

    python scripts/bench_infer.py [--preset bitnet-2b4t] [--batches 1,16] [--prompt-len 32]
                                  [--new-tokens 16] [--modes bf16,ternary-int8,ternary-2bit]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import packing
from bitnet_jax.infer.generate import Generator, generate, tree_bytes
from bitnet_jax.model.transformer import Transformer, get_model_config
from bitnet_jax.core.precision import get_recipe

MODES = {"bf16": ("bf16", "float", False), "ternary-int8": ("b1.58", "int8", True),
         "ternary-2bit": ("b1.58", "packed", True)}


def random_leaf(path: str, shape: tuple, dtype, rng: np.random.Generator) -> np.ndarray:
    """Random values of the right kind; a tiled block keeps a 2B model's set-up to seconds."""
    size = int(np.prod(shape))
    if path.endswith("packed"):
        rows = shape[0] * 4
        codes = np.resize(rng.integers(-1, 2, 1 << 20, dtype=np.int8), (rows, shape[1]))
        return packing.pack_2bit(codes)
    if path.endswith("codes"):
        return np.resize(rng.integers(-1, 2, 1 << 20, dtype=np.int8), shape)
    if path.endswith("scale") and jnp.dtype(dtype) == jnp.float32 and "norm" not in path:
        return np.full(shape, 0.02, np.float32)  # ternary weight scale (absmean of N(0, 0.02))
    if "norm" in path:
        return np.ones(shape, dtype)
    block = rng.standard_normal(min(size, 1 << 20)).astype(np.float32) * 0.02
    return np.resize(block, shape).astype(dtype)


def random_params(model: Transformer, rng: np.random.Generator):
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(random_leaf(jax.tree_util.keystr(path), s.shape, s.dtype,
                                                rng)), shapes)


def build(preset: str, mode: str) -> Generator:
    precision, weights, integer = MODES[mode]
    config = get_model_config(preset, dtype="bfloat16", param_dtype="bfloat16")
    recipe = get_recipe(precision)
    params = random_params(Transformer(config, recipe, integer, weights), np.random.default_rng(0))
    return Generator(config, recipe, params, weights, integer)


def decode_rate(generator: Generator, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode tokens/s over `new_tokens` steps, after a warm-up generation of the same shapes
    (which compiles the prefill and the decode step)."""
    prompts = [np.arange(1, prompt_len + 1) % generator.config.vocab_size] * batch
    generate(generator, prompts, new_tokens)
    result = generate(generator, prompts, new_tokens)
    step_s = result.decode_seconds / max(result.decode_steps, 1)
    return {"decode_tokens_per_s": result.decode_tokens_per_second, "step_ms": step_s * 1e3,
            "prefill_s": result.prefill_seconds, "decode_steps": result.decode_steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bitnet-2b4t")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="bench_infer.json")
    args = parser.parse_args(argv)

    meta = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "machine": platform.machine(), "preset": args.preset,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']}; {args.preset}; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} decoded")
    header = (f"{'mode':>13} {'batch':>5} {'weights GB':>10} {'step ms':>9} {'tokens/s':>9} "
              f"{'vs bf16':>8}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for mode in args.modes.split(","):
        began = time.perf_counter()
        generator = build(args.preset, mode)
        setup_s = time.perf_counter() - began
        for batch in map(int, args.batches.split(",")):
            rate = decode_rate(generator, batch, args.prompt_len, args.new_tokens)
            base = next((r for r in rows if r["mode"] == "bf16" and r["batch"] == batch), None)
            row = {"mode": mode, "batch": batch, "weight_bytes": tree_bytes(generator.params),
                   "setup_s": setup_s, **rate,
                   "speedup_vs_bf16": (rate["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                                       if base else 1.0)}
            rows.append(row)
            print(f"{mode:>13} {batch:5d} {row['weight_bytes'] / 1e9:10.2f} "
                  f"{row['step_ms']:9.1f} {row['decode_tokens_per_s']:9.2f} "
                  f"{row['speedup_vs_bf16']:8.2f}", flush=True)
            with open(args.out, "w") as f:  # after every row: a cut-off run keeps what it measured
                json.dump({"meta": meta, "results": rows}, f, indent=2)
        del generator
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
