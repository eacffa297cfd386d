"""Benchmark the matmul paths a BitLinear layer can take, in one run on one machine.

Measures, for a few (tokens x in -> out) shapes:
- raw products: float32, bfloat16 with float32 accumulation, int8 x int8 -> int32;
- a BitLinear forward: bf16 baseline, b1.58 fake-quantized (bf16 codes), b1.58 integer (int8);
- a BitLinear forward + backward (training) for the same three.
Ratios are taken within the run (the machines are shared and noisy). Prints a table and writes
JSON (default `bench_matmul.json`).

    python scripts/bench_matmul.py [--sizes 1024x1024x1024,...] [--repeats 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from bitnet_jax.allocator import active_allocator
from bitnet_jax.core import matmul
from bitnet_jax.core.precision import get_recipe


def time_fn(fn, *args, repeats: int) -> float:
    """Median wall time (s) of a compiled call, after one warm-up (compilation) call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def raw_products(m, k, n, repeats):
    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (m, k))
    w = jax.random.normal(key_w, (k, n))

    def dot(a, b, acc):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)

    x8 = jnp.clip(jnp.round(x * 30), -127, 127).astype(jnp.int8)
    w8 = jnp.clip(jnp.round(w), -1, 1).astype(jnp.int8)
    return {
        "f32": time_fn(jax.jit(lambda a, b: dot(a, b, jnp.float32)), x, w, repeats=repeats),
        "bf16": time_fn(jax.jit(lambda a, b: dot(a, b, jnp.float32)),
                        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), repeats=repeats),
        "int8": time_fn(jax.jit(lambda a, b: dot(a, b, jnp.int32)), x8, w8, repeats=repeats),
    }


def bitlinear_paths(m, k, n, repeats):
    key_x, key_w = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(key_x, (m, k), jnp.bfloat16)
    w = jax.random.normal(key_w, (k, n)) * 0.02
    ternary = get_recipe("b1.58").qkv
    paths = {
        "bf16": (None, None, False),
        "b1.58": (ternary.activation, ternary.weight, False),
        "b1.58-int8": (ternary.activation, ternary.weight, True),
    }
    results = {}
    for name, (qx, qw, integer) in paths.items():
        def forward(xv, wv, qx=qx, qw=qw, integer=integer):
            return matmul.quantized_dot(xv, wv, qx, qw, jnp.bfloat16, integer)

        def train(xv, wv, forward=forward):
            return jax.grad(lambda a, b: jnp.sum(forward(a, b).astype(jnp.float32)),
                            argnums=(0, 1))(xv, wv)

        results[f"fwd/{name}"] = time_fn(jax.jit(forward), x, w, repeats=repeats)
        results[f"fwd+bwd/{name}"] = time_fn(jax.jit(train), x, w, repeats=repeats)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048x512x512,2048x1024x1024,2048x2048x2048",
                        help="comma-separated MxKxN (tokens x in x out)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench_matmul.json")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    meta = {"backend": jax.default_backend(), "device": device.device_kind,
            "devices": jax.device_count(), "jax": jax.__version__,
            "machine": platform.machine(), "malloc": active_allocator(),
            "processor": platform.processor() or platform.machine()}
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']}")
    rows = []
    for size in args.sizes.split(","):
        m, k, n = (int(v) for v in size.lower().split("x"))
        timings = {**raw_products(m, k, n, args.repeats), **bitlinear_paths(m, k, n, args.repeats)}
        flops = 2 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "seconds": timings,
                     "tflops": {name: flops / t / 1e12 for name, t in timings.items()}})

    header = f"{'shape':>16} {'path':>20} {'ms':>9} {'TFLOP/s':>8} {'vs bf16':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = f"{row['m']}x{row['k']}x{row['n']}"
        for name, seconds in row["seconds"].items():
            kind = name.split("/")[0] + "/" if "/" in name else ""
            baseline = row["seconds"].get(f"{kind}bf16")
            ratio = f"{seconds / baseline:8.2f}" if baseline else ""
            print(f"{shape:>16} {name:>20} {seconds * 1e3:9.3f} {row['tflops'][name]:8.3f} {ratio}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    raise SystemExit(main())
