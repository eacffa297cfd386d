"""Benchmark: a linear's backward products in our kernels (AMX tiles, or AVX512-BF16 vectors on
CPUs without AMX) against XLA's bf16 dot.

For each shape (P and N a linear's input and output features, M the batch's tokens; x (M, P)
and g (M, N) bf16, dW (P, N) float32; ternary weight codes (P, N) int8 with one scale, dx
(M, P) bf16) it times, after warm-up, under `jax.jit`:
  xla      lax.dot_general(X^T, G), X^T (P, M) row-major, float32 accumulation (XLA:CPU)
  kernel   cpu_weight_gradient.weight_gradient_dot(X^T, G)
  before   cpu_int8_fused.quantize_transpose(x, mult, scale) then XLA's dot: the quantized
           paths' weight gradient before the kernel (8-bit absmax rows)
  fused    cpu_weight_gradient.quantized_weight_gradient(x, mult, scale, G): X_q^T built in
           L1, the quantized paths' weight gradient where the kernels run
  xla-dx   G W_q^T as the exact paths' backward wrote it before the kernel: the codes
           dequantized to bf16, XLA's dot with float32 accumulation, rounded to bf16
  dx       cpu_input_gradient.codes_input_gradient(G, codes, scale): the same from the codes
interleaved, `--rounds` times; each round takes the median of `--iters` calls. The table shows
the median over rounds, the ratios kernel / xla, fused / before and dx / xla-dx per round
(median and min..max; < 1: ours is faster), and whether each pair's outputs are equal bit for
bit. Needs a CPU with AMX (Intel Sapphire Rapids and later) or with AVX512-BF16 and no AMX (AMD
Zen 4): `cpu_int8.bf16_products`.

    python scripts/bench_weight_gradient.py --json runs/bench_weight_gradient.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import cpu_input_gradient, cpu_int8, cpu_int8_fused, cpu_weight_gradient
from bitnet_jax.core.quant import absmax_row_parameters

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_int8_kernel import median_ms  # noqa: E402  (one home for the per-round timing)

# (P, M, N): the linears of ladder-6.4m (d 256, ffn 704), ladder-20m (512, 1376) and
# ladder-1.6m (160, 448), batch 16 x 256 tokens.
SHAPES = [(256, 4096, 704), (704, 4096, 256), (256, 4096, 256), (512, 4096, 1376),
          (1376, 4096, 512), (512, 4096, 512), (160, 4096, 448), (448, 4096, 160)]
LO, HI = -128, 127


def _xla_dot(x_t, g):
    return jax.lax.dot_general(x_t, g, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _xla_input_gradient(g, codes, w_scale):
    w = (codes.astype(jnp.float32) * w_scale).astype(jnp.bfloat16)
    return jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)


FUNCTIONS = {
    "xla": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale: _xla_dot(x_t, g)),
    "kernel": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale:
                      cpu_weight_gradient.weight_gradient_dot(x_t, g)),
    "before": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale: _xla_dot(
        cpu_int8_fused.quantize_transpose(x, mult, scale, LO, HI), g)),
    "fused": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale:
                     cpu_weight_gradient.quantized_weight_gradient(x, mult, scale, g, LO, HI)),
    "xla-dx": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale:
                      _xla_input_gradient(g, codes, w_scale)),
    "dx": jax.jit(lambda x, x_t, mult, scale, g, codes, w_scale:
                  cpu_input_gradient.codes_input_gradient(g, codes, w_scale)),
}
PAIRS = (("kernel", "xla"), ("fused", "before"), ("dx", "xla-dx"))


def _operands(p, m, n, rng):
    x = jnp.asarray(rng.standard_t(3, (m, p)), jnp.bfloat16)
    mult, scale = absmax_row_parameters(x.astype(jnp.float32), HI, 1e-5)
    g = jnp.asarray(rng.standard_normal((m, n)) * 1e-3, jnp.bfloat16)
    codes = jnp.asarray(rng.integers(-1, 2, (p, n)), jnp.int8)
    return x, jnp.asarray(x.T), mult[:, 0], scale[:, 0], g, codes, jnp.float32(0.0213)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=15, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="bench_weight_gradient.json", help="output JSON path")
    ap.add_argument("--shapes", default=",".join(f"{p}x{m}x{n}" for p, m, n in SHAPES),
                    help="comma-separated PxMxN (default: the ladder presets' linears)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    if not cpu_weight_gradient.available():
        raise SystemExit("bench_weight_gradient: our backward kernels do not run here: "
                         + cpu_int8.bf16_products_missing())

    rng = np.random.default_rng(0)
    rows = []
    print(f"{'P x M x N':>18}" + "".join(f" {name + ' ms':>9}" for name in FUNCTIONS)
          + "".join(f" {a + '/' + b:>22}" for a, b in PAIRS) + "  equal", flush=True)
    for p, m, n in shapes:
        operands = _operands(p, m, n, rng)
        outputs = {name: np.asarray(fn(*operands)).view(np.uint8)  # bits, of f32 and bf16
                   for name, fn in FUNCTIONS.items()}
        equal = {f"{a}/{b}": bool(np.array_equal(outputs[a], outputs[b])) for a, b in PAIRS}
        for _ in range(args.warmup):
            jax.block_until_ready([fn(*operands) for fn in FUNCTIONS.values()])
        times = {name: [] for name in FUNCTIONS}
        for _ in range(args.rounds):
            for name, fn in FUNCTIONS.items():
                times[name].append(median_ms(fn, operands, args.iters))
        ratios = {f"{a}/{b}": [x / y for x, y in zip(times[a], times[b])] for a, b in PAIRS}
        rows.append({"shape": [p, m, n], "ms": times, "ratios": ratios, "bit_equal": equal})
        print(f"{f'{p} x {m} x {n}':>18}"
              + "".join(f" {statistics.median(t):9.2f}" for t in times.values())
              + "".join(f" {statistics.median(r):8.2f} ({min(r):.2f}..{max(r):.2f})"
                        for r in ratios.values())
              + "  " + " ".join(str(e) for e in equal.values()), flush=True)
    totals = {pair: sum(statistics.median(r["ms"][pair.split("/")[0]]) for r in rows)
              / sum(statistics.median(r["ms"][pair.split("/")[1]]) for r in rows)
              for pair in rows[0]["ratios"]}
    print("all shapes, sum of medians: "
          + ", ".join(f"{pair} {total:.2f}" for pair, total in totals.items()))
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
           "python": sys.version.split()[0], "iters": args.iters, "rounds": args.rounds,
           "rows": rows, "sum_of_medians": totals}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
