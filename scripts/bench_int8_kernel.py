"""Benchmark: XLA bf16 dot vs XLA int8 dot vs the AVX512-VNNI FFI kernel (bitnet_jax.core.cpu_int8).

For each shape (x (M, K) @ w (K, N)) it times, after warm-up, under `jax.jit`:
  bf16   x bf16 (M, K) @ w bf16 (K, N), f32 accumulation (XLA)
  int8   x int8 (M, K) @ w int8 (K, N), int32 accumulation (XLA)
  vnni   bitnet_jax.core.cpu_int8.int8_dot(x int8 (M, K), w int8 (N, K)) -> int32
The three are measured interleaved, `--rounds` times; each round reports the median of
`--iters` calls.  The table shows the median over rounds and the spread (min..max of the
per-round medians), plus ratios to bf16 (< 1 = faster than bf16).

    python scripts/bench_int8_kernel.py --json runs/bench_int8_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.allocator import active_allocator
from bitnet_jax.core import cpu_int8

TRAIN_SHAPES = [(4096, 512, 1376), (4096, 1376, 512), (4096, 512, 512), (4096, 256, 704)]
DECODE_SHAPES = [(2, 2560, 6912), (16, 2560, 6912)]


def median_ms(fn, args, iters: int) -> float:
    """The median of `iters` calls of fn(*args), each waited for, in milliseconds."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="bench_int8_kernel.json", help="output JSON path")
    ap.add_argument("--shapes", default="all", choices=["all", "train", "decode"])
    args = ap.parse_args()

    if not cpu_int8.available():
        raise SystemExit(f"VNNI kernel unavailable: {cpu_int8.unavailable_reason()}")
    shapes = {"all": TRAIN_SHAPES + DECODE_SHAPES, "train": TRAIN_SHAPES,
              "decode": DECODE_SHAPES}[args.shapes]

    bf16_dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    int8_dot_xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.int32))
    vnni_dot = jax.jit(cpu_int8.int8_dot)

    rng = np.random.default_rng(0)
    results = []
    for m, k, n in shapes:
        x8 = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w8 = rng.integers(-1, 2, (k, n), dtype=np.int8)  # ternary weights
        cases = {
            "bf16": (bf16_dot, (jnp.asarray(x8, jnp.bfloat16), jnp.asarray(w8, jnp.bfloat16))),
            "int8": (int8_dot_xla, (jnp.asarray(x8), jnp.asarray(w8))),
            "vnni": (vnni_dot, (jnp.asarray(x8), jnp.asarray(np.ascontiguousarray(w8.T)))),
        }
        ref = np.asarray(cases["int8"][0](*cases["int8"][1]))
        exact = bool(np.array_equal(np.asarray(cases["vnni"][0](*cases["vnni"][1])), ref))
        for fn, a in cases.values():
            for _ in range(args.warmup):
                jax.block_until_ready(fn(*a))
        per_round: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, a) in cases.items():
                per_round[name].append(median_ms(fn, a, args.iters))
        row = {"M": m, "K": k, "N": n, "exact": exact}
        for name, ts in per_round.items():
            row[name] = {"median_ms": statistics.median(ts), "min_ms": min(ts),
                         "max_ms": max(ts), "rounds_ms": ts}
        row["int8_over_bf16"] = row["int8"]["median_ms"] / row["bf16"]["median_ms"]
        row["vnni_over_bf16"] = row["vnni"]["median_ms"] / row["bf16"]["median_ms"]
        row["vnni_over_int8"] = row["vnni"]["median_ms"] / row["int8"]["median_ms"]
        row["vnni_gops"] = 2 * m * k * n / row["vnni"]["median_ms"] / 1e6
        results.append(row)

        def cell(name: str, row: dict = row) -> str:
            r = row[name]
            return f"{r['median_ms']:8.3f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})"

        print(f"M={m:5d} K={k:5d} N={n:5d} exact={exact} | bf16 {cell('bf16')} | "
              f"int8 {cell('int8')} x{row['int8_over_bf16']:.2f} | "
              f"vnni {cell('vnni')} x{row['vnni_over_bf16']:.2f} "
              f"({row['vnni_gops']:.0f} GOP/s)", flush=True)

    meta = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "malloc": active_allocator(),
            "iters": args.iters, "rounds": args.rounds, "warmup": args.warmup}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    main()
