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

`--compare-llamacpp` instead decodes one prompt (batch 1) with ours and with llama.cpp
(llama-cpp-python) on GGUF files of the very same random weights (`bitnet export-gguf`'s
writer: TQ2_0 linears with per-tensor scales for ternary-2bit, BF16 for bf16; the tied head bf16,
or with `--head int8` ours as int8 rows and llama.cpp's as Q8_0),
at the same thread count, interleaving the engines round by round so that a shared machine's
noise falls on all of them alike; ratios are per round, then the median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.allocator import active_allocator
from bitnet_jax.core import packing
from bitnet_jax.infer.generate import Generator, generate, tree_bytes, with_head
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


def build(preset: str, mode: str, head: str = "float", **overrides) -> Generator:
    precision, weights, integer = MODES[mode]
    config = get_model_config(preset, dtype="bfloat16", param_dtype="bfloat16", **overrides)
    recipe = get_recipe(precision)
    params = random_params(Transformer(config, recipe, integer, weights), np.random.default_rng(0))
    generator = Generator(config, recipe, params, weights, integer)
    return with_output_head(generator, head)


def with_output_head(generator: Generator, head: str) -> Generator:
    """The generator with its bf16 output head held as `head` ("int8": int8 rows)."""
    return Generator(generator.config, generator.recipe,
                     with_head(generator.params, head), generator.weights,
                     generator.integer, head)


def decode_rate(generator: Generator, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode tokens/s over `new_tokens` steps, after a warm-up generation of the same shapes
    (which compiles the prefill and the decode step)."""
    prompts = [np.arange(1, prompt_len + 1) % generator.config.vocab_size] * batch
    generate(generator, prompts, new_tokens)
    result = generate(generator, prompts, new_tokens)
    step_s = result.decode_seconds / max(result.decode_steps, 1)
    return {"decode_tokens_per_s": result.decode_tokens_per_second, "step_ms": step_s * 1e3,
            "prefill_s": result.prefill_seconds, "decode_steps": result.decode_steps}


# GGUF type of each compared mode's linears, and of the tied head for each of our heads.
LLAMACPP_TYPES = {"bf16": "bf16", "ternary-2bit": "tq2_0"}
LLAMACPP_HEAD_TYPES = {"float": "bf16", "int8": "q8_0"}


def _our_step_ms(generator: Generator, prompt: list, new_tokens: int) -> float:
    result = generate(generator, [prompt], new_tokens)
    return result.decode_seconds / max(result.decode_steps, 1) * 1e3


def _llama_step_ms(llm, prompt: list, new_tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    token = prompt[-1]
    began = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])  # the decode step alone: no sampling, as ours times its steps
    return (time.perf_counter() - began) / new_tokens * 1e3


def compare_llamacpp(args, meta: dict) -> int:
    """Ours vs llama.cpp on the same weights, interleaved; table + JSON."""
    import llama_cpp

    from bitnet_jax.interop.gguf import export_gguf
    from bitnet_jax.interop.run_dir import ModelBundle

    threads = args.threads or os.cpu_count()
    # llama.cpp's bitnet graph (0c1e570) gates the MLP with SiLU and ties the head: both engines
    # run swiglu, whose cost equals 2B4T's relu2 (one elementwise op on d_ff values).
    overrides = {"ffn_activation": "swiglu", "tie_embeddings": True}
    workdir = Path(args.gguf_dir or tempfile.mkdtemp(prefix="bench_gguf-"))
    workdir.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m in LLAMACPP_TYPES]
    engines = {}
    head_type = LLAMACPP_HEAD_TYPES[args.head]
    paths = {}
    for mode in modes:
        generator = build(args.preset, mode, **overrides)
        paths[mode] = path = workdir / f"{args.preset}-{mode}-{head_type}.gguf"
        if not path.exists():
            began = time.perf_counter()
            bundle = ModelBundle(generator.config, generator.recipe.name,
                                 jax.tree.map(np.asarray, generator.params), "bytes")
            export_gguf(bundle, path, LLAMACPP_TYPES[mode], head_type=head_type)
            print(f"# wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - began:.0f} s", flush=True)
        llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_len + args.new_tokens + 8,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        engines[mode] = (with_output_head(generator, args.head), llm)
    prompt = [int(t) for t in np.arange(1, args.prompt_len + 1)]
    for generator, llm in engines.values():  # warm-up: compile ours (the cache length of the
        # timed rounds: another length compiles again), page in both
        _our_step_ms(generator, prompt, args.new_tokens)
        _llama_step_ms(llm, prompt, 2)
    rounds = []
    for round_index in range(args.rounds):
        row = {}
        for mode, (generator, llm) in engines.items():
            row[f"ours {mode}"] = _our_step_ms(generator, prompt, args.new_tokens)
            row[f"llama.cpp {mode}"] = _llama_step_ms(llm, prompt, args.new_tokens)
        rounds.append(row)
        print(f"# round {round_index}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()),
              flush=True)
    summary = []
    for mode in engines:
        ratios = [r[f"ours {mode}"] / r[f"llama.cpp {mode}"] for r in rounds]
        summary.append({
            "mode": mode, "llama_cpp_type": LLAMACPP_TYPES[mode], "head": args.head,
            "llama_cpp_head_type": head_type,
            "ours_ms": statistics.median(r[f"ours {mode}"] for r in rounds),
            "llama_cpp_ms": statistics.median(r[f"llama.cpp {mode}"] for r in rounds),
            "ratio_median": statistics.median(ratios), "ratios": ratios,
            "gguf_bytes": paths[mode].stat().st_size,
            "our_weight_bytes": tree_bytes(engines[mode][0].params)})
    header = (f"{'weights':>13} {'llama.cpp':>9} {'ours ms/tok':>11} {'llama.cpp ms/tok':>16} "
              f"{'ours/llama.cpp':>14}")
    print(header)
    print("-" * len(header))
    for s in summary:
        print(f"{s['mode']:>13} {s['llama_cpp_type']:>9} {s['ours_ms']:11.1f} "
              f"{s['llama_cpp_ms']:16.1f} {s['ratio_median']:14.2f}")
    with open(args.out, "w") as f:
        json.dump({"meta": {**meta, "threads": threads, "rounds": args.rounds,
                            "llama_cpp_python": llama_cpp.__version__, "overrides": overrides,
                            "batch": 1}, "results": summary, "rounds": rounds}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bitnet-2b4t")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="bench_infer.json")
    parser.add_argument("--compare-llamacpp", action="store_true",
                        help="batch-1 decoding, ours vs llama.cpp on GGUFs of the same weights")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (compare)")
    parser.add_argument("--head", choices=("float", "int8"), default="float",
                        help="our output head: bf16, or int8 rows (llama.cpp then gets a Q8_0 "
                             "head in --compare-llamacpp)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads (default: all cores, as XLA uses)")
    parser.add_argument("--gguf-dir", default=None, help="where the GGUF files go (reused)")
    args = parser.parse_args(argv)

    meta = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "head": args.head,
            "jax": jax.__version__, "machine": platform.machine(), "preset": args.preset,
            "malloc": active_allocator(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    if args.compare_llamacpp:
        return compare_llamacpp(args, meta)
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']}; {args.preset}; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} decoded")
    header = (f"{'mode':>13} {'batch':>5} {'weights GB':>10} {'step ms':>9} {'tokens/s':>9} "
              f"{'vs bf16':>8}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for mode in args.modes.split(","):
        began = time.perf_counter()
        generator = build(args.preset, mode, args.head)
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
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    raise SystemExit(main())
