"""Benchmark training steps of bf16 and b1.58 models, in one run on one machine.

Measures the achieved bf16 matmul peak (f32 accumulation), then for each preset the time of a
full train step (forward, backward, AdamW update; the trainer's own jitted step) and its MFU
against that peak for: bf16; b1.58 with fake quantization; b1.58 with the int8 forward path.
Ratios are taken within the run, since the machines are shared and noisy. Prints a table and
writes JSON (default `bench_train.json`).

    python scripts/bench_train.py [--presets ladder-1.6m,ladder-6.4m,ladder-20m]
                                  [--batch 16] [--seq-len 256] [--steps 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax import compute, optim
from bitnet_jax.metrics import measure_matmul_peak
from bitnet_jax.config import OptimizerConfig
from bitnet_jax.model import Transformer, get_model_config
from bitnet_jax.precision import get_recipe
from bitnet_jax.steps import TrainState, make_train_step

MODES = {"bf16": ("bf16", False), "b1.58": ("b1.58", False), "b1.58-int8": ("b1.58", True)}


def step_time(preset: str, precision: str, integer: bool, batch: int, seq_len: int,
              steps: int) -> float:
    """Median seconds of one train step (after a compiling warm-up step)."""
    config = get_model_config(preset)
    model = Transformer(config, get_recipe(precision), integer=integer)
    optimizer = optim.make_optimizer(OptimizerConfig(warmup_steps=1), total_steps=1000)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0,
                                config.vocab_size)
    batch_data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch_data["inputs"][:1])["params"])
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    train_step = jax.jit(make_train_step(model, optimizer, grad_accum=1), donate_argnums=0)
    state, metrics = train_step(state, batch_data)
    jax.block_until_ready(metrics)
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch_data)
        jax.block_until_ready(metrics)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="ladder-1.6m,ladder-6.4m,ladder-20m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="matmul size for the measured bf16 peak")
    parser.add_argument("--out", default="bench_train.json")
    args = parser.parse_args(argv)

    meta = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "machine": platform.machine(),
            "batch": args.batch, "seq_len": args.seq_len}
    peak = measure_matmul_peak(args.peak_size, repeats=10)
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']}; batch {args.batch} x "
          f"{args.seq_len} tokens; measured bf16 matmul peak {peak / 1e12:.3f} TFLOP/s")
    header = f"{'preset':>12} {'mode':>11} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} {'vs bf16':>8}"
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for preset in args.presets.split(","):
        config = get_model_config(preset)
        flops = compute.flops_per_token(config, "causal", args.seq_len) * args.batch * args.seq_len
        for mode, (precision, integer) in MODES.items():
            seconds = step_time(preset, precision, integer, args.batch, args.seq_len, args.steps)
            base = next((r for r in rows if r["preset"] == preset and r["mode"] == "bf16"), None)
            row = {"preset": preset, "mode": mode, "step_s": seconds,
                   "tokens_per_s": args.batch * args.seq_len / seconds,
                   "mfu_vs_measured_peak": flops / seconds / peak,
                   "vs_bf16": seconds / base["step_s"] if base else 1.0}
            rows.append(row)
            print(f"{preset:>12} {mode:>11} {seconds * 1e3:9.1f} {row['tokens_per_s']:10.0f} "
                  f"{row['mfu_vs_measured_peak']:6.1%} {row['vs_bf16']:8.2f}", flush=True)
            with open(args.out, "w") as f:  # after every row: a cut-off run keeps what it measured
                json.dump({"meta": meta, "peak_flops": peak, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
