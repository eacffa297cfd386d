"""Does a small reduction beside each product slow a chain of XLA:CPU products by more than it
costs itself?

The question behind b1.58's weight-quantization kernel (docs/cpu_training_step_history.md): in the
trained step, XLA's mean|W| and codes per linear cost the step far more than their own op time, and
our reading was that the runtime runs them concurrently with the products, which then lose a core.
This times that reading in isolation: a chain of `--layers` bf16 products of x with a linear's
ternary codes, round(W / s) clipped to [-1, 1] from float32 weights W, each output times s, where
s is
- passed in ("codes, scales given"),
- a compile-time constant ("codes, scales constant"),
- mean|W| computed in the same program ("codes, scales reduced beside each product"),
- every mean|W| computed first, behind an optimization barrier ("codes, scales reduced first"),
against the chain of plain bf16 products ("plain") and the reductions alone. The programs run
interleaved, one call of each per round in rotating order (`bench_train.interleaved_step_times`);
ratios to "plain" are paired per round with a 95% bootstrap interval (`bench_train.paired_ratio`).
Prints a table and writes JSON (default `bench_reduction_beside_products.json`).

    python scripts/bench_reduction_beside_products.py [--layers 12] [--tokens 4096]
                                                      [--width 512] [--rounds 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.allocator import active_allocator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (interleaved timing and paired ratios: one home for both)

_DOT = (((1,), (0,)), ((), ()))


def _product(x, w_bf16):
    return jax.lax.dot_general(x, w_bf16, _DOT, preferred_element_type=jnp.float32)


def plain(x, ws):
    for w in ws:
        x = _product(x, w.astype(jnp.bfloat16)).astype(jnp.bfloat16)
    return x


def codes_chain(x, ws, scales):
    for w, scale in zip(ws, scales):
        codes = jnp.clip(jnp.round(w / scale), -1, 1).astype(jnp.bfloat16)
        x = (_product(x, codes) * scale).astype(jnp.bfloat16)
    return x


def mean_abs(ws):
    # No gradient flows through it in the quantizers either (straight-through estimator).
    return [jnp.mean(jnp.abs(jax.lax.stop_gradient(w))) for w in ws]


def reduced_beside_each_product(x, ws):
    return codes_chain(x, ws, mean_abs(ws))


def reduced_first(x, ws):
    scales = jax.lax.optimization_barrier(mean_abs(ws))
    x = jax.lax.optimization_barrier((x, scales))[0]
    return codes_chain(x, ws, scales)


def programs(layers: int, tokens: int, width: int) -> dict:
    """name -> (a `bench_train` step: (state, args) -> (state, output), state, args)."""
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(width, width)) * width ** -0.5, jnp.float32)
          for _ in range(layers)]
    x = jnp.asarray(rng.normal(size=(tokens, width)), jnp.bfloat16)
    scales = jax.jit(mean_abs)(ws)
    constants = [float(scale) for scale in scales]

    def as_step(fn):
        compiled = jax.jit(fn)
        return lambda state, args: (state, compiled(*args))

    return {"plain": (as_step(plain), None, (x, ws)),
            "codes, scales given": (as_step(codes_chain), None, (x, ws, scales)),
            "codes, scales constant": (as_step(lambda x, ws: codes_chain(x, ws, constants)),
                                       None, (x, ws)),
            "codes, scales reduced beside each product": (
                as_step(reduced_beside_each_product), None, (x, ws)),
            "codes, scales reduced first": (as_step(reduced_first), None, (x, ws)),
            "the reductions alone": (as_step(mean_abs), None, (ws,))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="bench_reduction_beside_products.json")
    args = parser.parse_args(argv)

    steps = programs(args.layers, args.tokens, args.width)
    for name, (step, state, step_args) in steps.items():  # compile and warm up
        jax.block_until_ready(step(state, step_args)[1])
    times = bench_train.interleaved_step_times(steps, args.rounds)
    meta = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__,
            "allocator": active_allocator(), "layers": args.layers, "tokens": args.tokens,
            "width": args.width, "rounds": args.rounds}
    print(f"# {jax.default_backend()} / jax {jax.__version__} / {active_allocator()}; "
          f"{args.layers} products of {args.tokens} x {args.width} x {args.width}")
    rows = []
    for name, samples in times.items():
        ratio, low, high = bench_train.paired_ratio(samples, times["plain"])
        rows.append({"program": name, "median_ms": 1e3 * float(np.median(samples)),
                     "vs_plain": ratio, "low": low, "high": high})
        print(f"{name:>42}  {rows[-1]['median_ms']:8.2f} ms  {ratio:.3f} [{low:.3f}, {high:.3f}]")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    raise SystemExit(main())
