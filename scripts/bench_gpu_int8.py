"""Benchmark: the integer path's forward product on an NVIDIA GPU, XLA's against the Pallas kernel.

For each shape (codes (M, K) int8, ternary weights (N, K) int8, one float32 scale per row and
per output feature) it times, jitted and interleaved round by round:
  bf16     x bf16 @ w bf16 with float32 sums, rounded to bf16 (the bf16 step's product)
  xla      the integer path as XLA takes it: int8 dot with int32 sums (cuBLAS), then a pass that
           applies both scales and rounds to bf16 (`matmul._forward`)
  pallas   `gpu_int8.int8_scaled_dot`, one tiling per column (`--tilings`)
and checks every Pallas output against XLA's bit for bit. The default shapes are the forward
products of b1.58-700m and spectra-390m at the GPU benchmark's 8 x 2048 tokens. Each round
reports the median of `--iters` calls; the table shows the median over rounds, and ratios to
the xla column (< 1: faster). Writes JSON.

    python scripts/bench_gpu_int8.py --json bench_gpu_int8.json
    python scripts/bench_gpu_int8.py --tilings 128,128,128,8,3 128,256,64,8,3

Needs a GPU; `--interpret` runs the same comparison in Pallas's interpreter on any backend
(correctness only: its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import gpu_int8

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_int8_kernel import median_ms  # noqa: E402  (one home for the per-round timing)

TOKENS = 8 * 2048
SHAPES = {  # (M, K, N) of each preset's forward products: q/k/v/o, gate/up, down
    "b1.58-700m": [(TOKENS, 1536, 1536), (TOKENS, 1536, 4096), (TOKENS, 4096, 1536)],
    "spectra-390m": [(TOKENS, 1024, 1024), (TOKENS, 1024, 2560), (TOKENS, 2560, 1024)],
}
DEFAULT_TILINGS = ["128,128,128,8,3", "128,256,64,8,3", "256,128,64,8,3", "64,128,128,4,4"]


def parse_tiling(text: str) -> gpu_int8.Tiling:
    try:
        return gpu_int8.parse_tiling(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_shape(text: str) -> tuple[int, int, int]:
    m, k, n = (int(v) for v in text.lower().split("x"))
    return m, k, n


def bf16_product(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def operands(m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    w_codes = jnp.asarray(rng.integers(-1, 2, (n, k)), jnp.int8)
    row_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, m), jnp.float32)
    w_scale = jnp.asarray(rng.uniform(0.1, 2.0, n), jnp.float32)
    return codes, row_scale, w_codes, w_scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="b1.58-700m,spectra-390m",
                        help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=None,
                        help="MxKxN shapes instead of the presets'")
    parser.add_argument("--tilings", nargs="*", type=parse_tiling,
                        default=[parse_tiling(t) for t in DEFAULT_TILINGS],
                        help="block_m,block_n,block_k,warps,stages (one Pallas column each)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interpret", action="store_true",
                        help="Pallas's interpreter: checks the numbers on any backend")
    parser.add_argument("--json", default="bench_gpu_int8.json")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.interpret:
        print(f"bench_gpu_int8: needs a GPU (the backend is {jax.default_backend()}); "
              "--interpret checks the numbers without one", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = [("custom", s) for s in args.shapes]
    else:
        unknown = set(args.presets.split(",")) - set(SHAPES)
        if unknown:
            parser.error(f"--presets: unknown {', '.join(sorted(unknown))}")
        shapes = [(p, s) for p in args.presets.split(",") for s in SHAPES[p]]

    device = jax.devices()[0]
    print(f"# {jax.default_backend()} / {device.device_kind} / jax {jax.__version__}; "
          f"median ms over {args.rounds} rounds of {args.iters} calls"
          + (" (interpreted: times mean nothing)" if args.interpret else ""))
    results = []
    for index, (preset, (m, k, n)) in enumerate(shapes):
        codes, row_scale, w_codes, w_scale = operands(m, k, n, seed=index)
        cases = {"bf16": (jax.jit(bf16_product), (codes.astype(jnp.bfloat16),
                                                  w_codes.astype(jnp.bfloat16))),
                 "xla": (jax.jit(gpu_int8.xla_product), (codes, row_scale, w_codes, w_scale))}
        tilings = [t for t in args.tilings if gpu_int8.whole_blocks(m, n, k, t)]
        for tile in tilings:
            fn = jax.jit(lambda *a, tile=tile: gpu_int8.int8_scaled_dot(
                *a, tile=tile, interpret=args.interpret))
            cases[",".join(map(str, tile))] = (fn, (codes, row_scale, w_codes, w_scale))
        want = np.asarray(cases["xla"][0](*cases["xla"][1])).view(np.uint16)
        exact = {name: bool(np.array_equal(np.asarray(fn(*a)).view(np.uint16), want))
                 for name, (fn, a) in cases.items() if name not in ("bf16", "xla")}
        per_round = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, a) in cases.items():
                per_round[name].append(median_ms(fn, a, args.iters))
        medians = {name: statistics.median(ts) for name, ts in per_round.items()}
        row = {"preset": preset, "M": m, "K": k, "N": n, "median_ms": medians,
               "rounds_ms": per_round, "exact": exact,
               "vs_xla": {name: ms / medians["xla"] for name, ms in medians.items()},
               "int8_tops": {name: 2 * m * k * n / ms / 1e9 for name, ms in medians.items()}}
        results.append(row)
        cells = " | ".join(f"{name} {ms:7.3f} ms x{row['vs_xla'][name]:.2f}"
                           + ("" if name in ("bf16", "xla") else
                              " exact" if exact[name] else " DIFFERS")
                           for name, ms in medians.items())
        print(f"{preset:12s} {m}x{k}x{n} | {cells}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": jax.default_backend(), "device": device.device_kind,
            "jax": jax.__version__, "iters": args.iters, "rounds": args.rounds,
            "interpret": args.interpret}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {args.json}")
    return 0 if all(all(row["exact"].values()) for row in results) else 1


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    sys.exit(main())
