"""Benchmark: the weight gradient's X^T G on AMX tiles in our kernel against XLA's bf16 dot.

For each shape (X^T (P, M) bf16 row-major, G (M, N) bf16 -> float32 (P, N); P and N a linear's
input and output features, M the batch's tokens) it times, after warm-up, under `jax.jit`:
  xla     lax.dot_general(X^T, G) with float32 accumulation (XLA:CPU: YNNPACK, AMX where present)
  kernel  bitnet_jax.core.cpu_weight_gradient.weight_gradient_dot(X^T, G)
interleaved, `--rounds` times; each round takes the median of `--iters` calls. The table shows
the median over rounds, the spread (min..max of the rounds' medians) and the ratio kernel / xla
per round (< 1: the kernel is faster), and whether the two outputs are equal bit for bit.
Needs a CPU with AMX (Intel Sapphire Rapids and later).

    python scripts/bench_weight_gradient.py --json runs/bench_weight_gradient.json
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

from bitnet_jax.core import cpu_weight_gradient

# (P, M, N): the linears of ladder-6.4m (d 256, ffn 704), ladder-20m (512, 1376) and
# ladder-1.6m (160, 448), batch 16 x 256 tokens.
SHAPES = [(256, 4096, 704), (704, 4096, 256), (256, 4096, 256), (512, 4096, 1376),
          (1376, 4096, 512), (512, 4096, 512), (160, 4096, 448), (448, 4096, 160)]


def _median_ms(fn, args, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="bench_weight_gradient.json", help="output JSON path")
    args = ap.parse_args()
    if not cpu_weight_gradient.available():
        raise SystemExit("bench_weight_gradient: our kernels do not run on AMX tiles here "
                         "(an AMX CPU, the kernels built, BITNET_JAX_CPU_AMX not 0)")

    xla = jax.jit(lambda a, g: jax.lax.dot_general(a, g, (((1,), (0,)), ((), ())),
                                                   preferred_element_type=jnp.float32))
    kernel = jax.jit(cpu_weight_gradient.weight_gradient_dot)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'P x M x N':>18} {'xla ms':>19} {'kernel ms':>19} {'kernel/xla':>18} {'TFLOP/s':>8}"
          f" {'equal':>6}", flush=True)
    for p, m, n in SHAPES:
        a = jnp.asarray(rng.standard_normal((p, m)), jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal((m, n)) * 1e-3, jnp.bfloat16)
        equal = bool(np.array_equal(np.asarray(kernel(a, g)), np.asarray(xla(a, g))))
        for _ in range(args.warmup):
            jax.block_until_ready((kernel(a, g), xla(a, g)))
        times = {"xla": [], "kernel": []}
        for _ in range(args.rounds):
            times["xla"].append(_median_ms(xla, (a, g), args.iters))
            times["kernel"].append(_median_ms(kernel, (a, g), args.iters))
        ratios = [k / x for k, x in zip(times["kernel"], times["xla"])]
        med = {name: statistics.median(t) for name, t in times.items()}
        tflops = 2 * p * m * n / med["kernel"] / 1e9
        rows.append({"shape": [p, m, n], "xla_ms": times["xla"], "kernel_ms": times["kernel"],
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "kernel_tflops": tflops, "bit_equal": equal})
        spread = lambda t: f"{statistics.median(t):6.2f} ({min(t):.2f}..{max(t):.2f})"  # noqa: E731
        print(f"{f'{p} x {m} x {n}':>18} {spread(times['xla']):>19} "
              f"{spread(times['kernel']):>19} "
              f"{statistics.median(ratios):6.2f} ({min(ratios):.2f}..{max(ratios):.2f}) "
              f"{tflops:8.2f} {str(equal):>6}", flush=True)
    total = sum(statistics.median(r["kernel_ms"]) for r in rows) / sum(
        statistics.median(r["xla_ms"]) for r in rows)
    print(f"all shapes, sum of medians: kernel / xla {total:.2f}")
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
           "python": sys.version.split()[0], "iters": args.iters, "rounds": args.rounds,
           "rows": rows, "kernel_over_xla_sum_of_medians": total}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
