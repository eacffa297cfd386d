"""Benchmark training steps of bf16 and b1.58 models, in one run on one machine.

Measures the achieved bf16 matmul peak (f32 accumulation), then for each preset the time of a
full train step (forward, backward, AdamW update; the trainer's own jitted step) and its MFU
against that peak for: bf16; b1.58 with fake quantization; b1.58 on the integer path (int8 x
int8 -> int32 forward products; on CPU the activations are quantized inside the int8 kernel,
which also writes X_q^T for the weight gradient). `--modes` adds: b1.58-int8-unfused (the
integer path with a separate XLA quantization pass and int8 codes, as before the fused kernel),
b1.58-int8-bwd (the integer path with `int8_backward`: dx as an int8 product, not exact),
b1.58-int8-vnni (the integer path on our VNNI kernels even where the CPU has AMX, on which XLA's
own int8 dot is faster and taken by default), b1.58-xla-dw (fake quantization with X_q^T for the
weight gradient written by XLA, not by our kernel), b1.58-bf16-codes (fake quantization with its
forward product on bf16 codes even where the int8 product is exact and faster: AMX CPUs and
NVIDIA GPUs), b1.58-xla-wg and b1.58-int8-bwd-xla-wg (on AMX CPUs the weight gradient as X_q^T
written and XLA's dot, as before `cpu_weight_gradient`), bf16-kernel-wg (bf16's own weight
gradient in that kernel: what the baseline would gain from it), b1.58-xla-ig (on AMX CPUs the
exact input gradient as XLA's dot of g and the dequantized weights, as before
`cpu_input_gradient`), b1.58-xla-bwd and b1.58-int8-xla-bwd (both backward products as XLA's
dots: on AVX512-BF16 CPUs without AMX, as before 2026-12-05, 23:00),
bf16-null (the baseline a second time: its ratio is the noise floor of every other ratio),
bf16-xla-dw (bf16 with its weight gradient as XLA's own dot, which XLA:CPU runs in float32;
`matmul.weight_gradient` gives it a transposed bf16 copy instead, see there),
bf16-xla-attention (bf16 with `jax.nn`'s attention on CPU, as before `model.cpu_attention`),
bf16-bf16-activation and b1.58-bf16-activation (the gated MLP's act(gate) * up computed in bf16,
as before `layers.gated_hidden` computed it in float32), and
the two halves of b1.58's fake quantization on their own, to see which one costs: w1.58a16
(ternary weights, bf16 activations) and w16a8 (bf16 weights, 8-bit per-token activations);
bf16-, b1.58- and w1.58a16-memory-scheduler (the step compiled with XLA:CPU's memory-optimized
HLO scheduler instead of its default, concurrency-optimized one), and bf16-scan and b1.58-scan
(the blocks as one `nn.scan`, `model.scan_layers=true`, instead of unrolled). Ratios
are taken within the run, with the modes' steps interleaved, since the machines are shared and
noisy: each mode's ratio to bf16 is the median of its per-round ratios, with a 95% bootstrap
interval. Each row also gives the kernel's (system) CPU time per step, from getrusage, which
shows when the process pays for memory instead of computing (glibc's malloc: `allocator.py`).
Prints a table and writes JSON (default `bench_train.json`, every step's time kept).

    python scripts/bench_train.py [--presets ladder-1.6m,ladder-6.4m,ladder-20m]
                                  [--modes bf16,b1.58,b1.58-int8,bf16-xla-dw]
                                  [--batch 16] [--seq-len 256]
                                  [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import NamedTuple, Optional
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from bitnet_jax.allocator import active_allocator
from bitnet_jax.core import (cpu_input_gradient, cpu_int8, cpu_int8_fused, cpu_order_statistics,
                             cpu_ternary, cpu_weight_gradient, gpu_int8, matmul, order_statistics,
                             quant)
from bitnet_jax.model import accounting as compute, cpu_attention, layers
from bitnet_jax.train import optim
from bitnet_jax.train.metrics import measure_matmul_peak
from bitnet_jax.config import OptimizerConfig
from bitnet_jax.model.transformer import Transformer, get_model_config
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.train.steps import TrainState, make_train_step

class Mode(NamedTuple):
    """How one mode trains: its recipe, and what differs from the defaults of the trainer."""

    precision: str
    integer: bool = False  # int8 x int8 -> int32 forward products
    int8_backward: bool = False  # dx as an int8 product (not exact)
    fused: bool = True  # activations quantized inside the CPU int8 kernel
    bf16_weight_gradient: bool = True  # `matmul.weight_gradient`, else XLA's own X^T G
    cpu_attention: bool = True  # `model.cpu_attention` on CPUs, else `jax.nn`'s attention
    kernel_x_transpose: bool = True  # X_q^T for dW from our CPU kernel, else from XLA
    xla_int8_on_amx: bool = True  # on AMX CPUs XLA's int8 dot, else always our VNNI kernels
    # (AMX tiles off in our kernels too, BITNET_JAX_CPU_AMX=0 around each of the mode's steps)
    kernel_amx: bool = True  # on AMX CPUs our kernels take both paths' int8 products on AMX
    # tiles (`cpu_int8.kernel_uses_amx`: x quantized once, `int8_scaled_dot`), else XLA's dot
    kernel_weight_gradient: bool = True  # on AMX or AVX512-BF16 CPUs dW = X_q^T G in our
    # kernel (`cpu_weight_gradient`), else XLA's bf16 dot
    kernel_input_gradient: bool = True  # on AMX or AVX512-BF16 CPUs the exact dx = g W_q^T in
    # our kernel (`cpu_input_gradient`), else XLA's bf16 dot of g and the dequantized weights
    bf16_kernel_weight_gradient: bool = False  # bf16's own X^T G in that kernel too (what
    # the baseline would gain from it), else XLA's
    int8_fake_product: bool = True  # fake quantization's product on int8 codes where exact
    # and faster (AMX CPUs, NVIDIA GPUs), else on bf16 codes
    memory_scheduler: bool = False  # XLA:CPU's memory-optimized HLO scheduler, not its default
    # concurrency-optimized one (a per-compile option; CPUs only)
    scan_layers: bool = False  # the blocks as one nn.scan (`model.scan_layers`), not unrolled
    weight_kernel: bool = True  # per-tensor ternary weights quantized in one pass by our CPU
    # kernel (`cpu_ternary`), else by XLA (a reduction and an elementwise pass)
    activation_kernel: bool = True  # absmax activations of XLA's int8 products (AMX) quantized
    # in one pass by our kernel (`cpu_int8_fused.absmax_quantize`), else by XLA
    gradient_kernel: bool = True  # with int8_backward, g's rows quantized by our kernels
    # (`matmul._kernel_quantizes_gradient`), else by XLA
    quantizer_derivative: bool = False  # the fake quantizers (a4.8's KV cache) differentiated
    # as JAX did before `quant.fake_quantize` stopped their gradient (the STE discards it)
    bisection_topk: bool = True  # a4.8's TopK threshold by bisection on CPUs
    # (`order_statistics.kth_largest`, as `quant` takes it), else by XLA's TopK (a sort per row)
    kth_kernel: bool = True  # that bisection in our CPU kernel (`cpu_order_statistics`), else
    # as XLA's passes over the whole array
    ynn_eltwise: bool = False  # XLA:CPU's YNNPACK fusions take elementwise operations too
    # (`--xla_cpu_experimental_ynn_fusion_type`), not only products
    float32_activation: bool = True  # the gated MLP's act(gate) * up in float32, rounded once
    # (`layers.gated_hidden`), else in the compute dtype, rounded after every operation
    gpu_epilogue: bool = False  # on NVIDIA GPUs the int8 product and its scales in one Pallas
    # kernel (`gpu_int8`, as BITNET_JAX_GPU_INT8_EPILOGUE=1), else cuBLAS's dot and XLA's pass


MODES = {"bf16": Mode("bf16"), "b1.58": Mode("b1.58"),
         "b1.58-int8": Mode("b1.58", integer=True),
         "b1.58-int8-unfused": Mode("b1.58", integer=True, fused=False),
         "b1.58-int8-bwd": Mode("b1.58", integer=True, int8_backward=True),
         "b1.58-int8-bwd-xla-grad-quant": Mode("b1.58", integer=True, int8_backward=True,
                                               gradient_kernel=False),
         "bf16-xla-dw": Mode("bf16", bf16_weight_gradient=False),
         "bf16-xla-attention": Mode("bf16", cpu_attention=False),
         "b1.58-xla-dw": Mode("b1.58", kernel_x_transpose=False),
         "b1.58-int8-vnni": Mode("b1.58", integer=True, xla_int8_on_amx=False),
         "b1.58-xla-amx": Mode("b1.58", kernel_amx=False),
         "b1.58-int8-xla-amx": Mode("b1.58", integer=True, kernel_amx=False),
         "b1.58-int8-bwd-xla-amx": Mode("b1.58", integer=True, int8_backward=True,
                                        kernel_amx=False),
         "a4.8-xla-amx": Mode("a4.8", kernel_amx=False),
         "b1.58-xla-wg": Mode("b1.58", kernel_weight_gradient=False),
         "b1.58-int8-bwd-xla-wg": Mode("b1.58", integer=True, int8_backward=True,
                                       kernel_weight_gradient=False),
         "bf16-kernel-wg": Mode("bf16", bf16_kernel_weight_gradient=True),
         "b1.58-xla-ig": Mode("b1.58", kernel_input_gradient=False),
         "b1.58-xla-bwd": Mode("b1.58", kernel_weight_gradient=False,
                               kernel_input_gradient=False),
         "b1.58-int8-xla-bwd": Mode("b1.58", integer=True, kernel_weight_gradient=False,
                                    kernel_input_gradient=False),
         "b1.58-bf16-codes": Mode("b1.58", int8_fake_product=False),
         "b1.58-xla-weight-quant": Mode("b1.58", weight_kernel=False),
         "b1.58-xla-act-quant": Mode("b1.58", activation_kernel=False),
         "b1.58-xla-quant": Mode("b1.58", weight_kernel=False, activation_kernel=False),
         "b1.58-int8-xla-weight-quant": Mode("b1.58", integer=True, weight_kernel=False),
         # b1.58's fake quantization split in two: which half costs (an ablation)
         "w1.58a16": Mode("w1.58a16"), "w16a8": Mode("w16a8"),
         "a4.8": Mode("a4.8"), "a4.8-int8": Mode("a4.8", integer=True),
         "a4.8-xla-topk": Mode("a4.8", bisection_topk=False),
         "a4.8-xla-bisection": Mode("a4.8", kth_kernel=False),
         "a4.8-kv-derivative": Mode("a4.8", quantizer_derivative=True),
         # The baseline again, compiled and timed as a mode of its own: its ratio to bf16 is
         # the spread a ratio has on this machine when nothing differs.
         "bf16-null": Mode("bf16"),
         # XLA:CPU's HLO schedulers, and scanned blocks, on the step's speed
         "bf16-memory-scheduler": Mode("bf16", memory_scheduler=True),
         "b1.58-memory-scheduler": Mode("b1.58", memory_scheduler=True),
         "w1.58a16-memory-scheduler": Mode("w1.58a16", memory_scheduler=True),
         "bf16-ynn-eltwise": Mode("bf16", ynn_eltwise=True),
         "b1.58-ynn-eltwise": Mode("b1.58", ynn_eltwise=True),
         "b1.58-int8-bwd-ynn-eltwise": Mode("b1.58", integer=True, int8_backward=True,
                                            ynn_eltwise=True),
         "bf16-bf16-activation": Mode("bf16", float32_activation=False),
         "b1.58-bf16-activation": Mode("b1.58", float32_activation=False),
         "b1.58-gpu-epilogue": Mode("b1.58", gpu_epilogue=True),
         "b1.58-int8-gpu-epilogue": Mode("b1.58", integer=True, gpu_epilogue=True),
         "bf16-scan": Mode("bf16", scan_layers=True),
         "b1.58-scan": Mode("b1.58", scan_layers=True)}
DEFAULT_MODES = "bf16,b1.58,b1.58-int8"
YNN_ELTWISE_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_ELTWISE"


def compiled_step(preset: str, mode: Mode, batch: int, seq_len: int):
    """The trainer's jitted train step for one preset and mode, compiled and run once."""
    with contextlib.ExitStack() as patches:
        if not mode.fused:  # before the fusion, when no kernel of ours ran on AMX tiles either
            patches.enter_context(mock.patch.object(cpu_int8_fused, "available", lambda: False))
            patches.enter_context(mock.patch.object(cpu_int8, "kernel_uses_amx", lambda: False))
        if not mode.bf16_weight_gradient:
            # XLA's own layout for X^T G (the form before `matmul.weight_gradient`)
            patches.enter_context(mock.patch.object(matmul, "weight_gradient",
                                                    matmul.contract_leading))
        if not mode.kernel_x_transpose:  # X_q^T as XLA writes it (before 2026-12-04)
            patches.enter_context(mock.patch.object(matmul, "_kernel_quantizes_x_rows",
                                                    lambda *args: False))
        if not mode.xla_int8_on_amx:  # the VNNI kernels whatever the CPU (before 2026-12-04)
            patches.enter_context(mock.patch.object(cpu_int8, "xla_int8_is_faster",
                                                    lambda rows: False))
        if not (mode.kernel_amx and mode.xla_int8_on_amx):  # before 2026-12-05, 10:00
            patches.enter_context(mock.patch.object(cpu_int8, "kernel_uses_amx",
                                                    lambda: False))
        if not mode.kernel_weight_gradient:  # XLA's dot for dW (before 2026-12-05, 12:15)
            patches.enter_context(mock.patch.object(cpu_weight_gradient, "available",
                                                    lambda: False))
        if not mode.kernel_input_gradient:  # XLA's dot for the exact dx (before 2026-12-05,
            # 15:20)
            patches.enter_context(mock.patch.object(cpu_input_gradient, "available",
                                                    lambda: False))
        if mode.bf16_kernel_weight_gradient and cpu_weight_gradient.available():
            patches.enter_context(mock.patch.object(matmul, "_transposed_dot",
                                                    cpu_weight_gradient.weight_gradient_dot))
        if not mode.int8_fake_product:  # bf16 codes, whatever the device (before 2026-12-04)
            patches.enter_context(mock.patch.object(matmul, "_int8_product_is_exact",
                                                    lambda *args: False))
        if not mode.weight_kernel:  # the weights' quantization as XLA runs it (before 2026-12-05)
            patches.enter_context(mock.patch.object(cpu_ternary, "applies", lambda *args: False))
        if not mode.activation_kernel:  # x's quantization as XLA runs it (before 2026-12-05)
            patches.enter_context(mock.patch.object(matmul, "_kernel_quantizes_activation",
                                                    lambda *args: False))
        if not mode.gradient_kernel:  # g's quantization by XLA (AMX CPUs: before 2026-12-05)
            patches.enter_context(mock.patch.object(matmul, "_kernel_quantizes_gradient",
                                                    lambda *args: False))
        if not mode.bisection_topk:  # XLA's TopK on every platform (before 2026-12-05)
            patches.enter_context(mock.patch.object(quant, "kth_largest",
                                                    order_statistics._top_k_value))
        if not mode.kth_kernel:  # the bisection as XLA's passes (before 2026-12-05, 07:00)
            patches.enter_context(mock.patch.object(cpu_order_statistics, "applies",
                                                    lambda values: False))
        if not mode.float32_activation:  # act(gate) * up in bf16 (before 2026-12-06, 03:50)
            patches.enter_context(mock.patch.object(
                layers, "gated_hidden",
                lambda activation, gate, up, dtype: layers.ffn_activation(activation)(gate) * up))
        if mode.quantizer_derivative:  # before 2026-12-05: the quantizer saw x's tangent
            patches.enter_context(mock.patch.object(
                quant, "fake_quantize",
                lambda quantizer, x: quant.ste(x, quantizer(x).dequantize(x.dtype))))
        if mode.gpu_epilogue:  # not yet the default: untimed on a GPU (2026-12-06)
            patches.enter_context(mock.patch.object(gpu_int8, "enabled", lambda: True))
        if not mode.cpu_attention:  # attention as before `model.cpu_attention`
            patches.enter_context(mock.patch.object(cpu_attention, "causal_attention_block",
                                                    layers._xla_causal_block))
        options = ({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
                   if mode.memory_scheduler else {})
        if mode.ynn_eltwise:
            options["xla_cpu_experimental_ynn_fusion_type"] = YNN_ELTWISE_FUSIONS
        config = dataclasses.replace(get_model_config(preset), scan_layers=mode.scan_layers)
        step = _compiled_step(config, mode.precision, mode.integer, mode.int8_backward, batch,
                              seq_len, options)
    return step if mode.xla_int8_on_amx else (_without_amx_tiles(step[0]), *step[1:])


def _without_amx_tiles(train_step):
    """`train_step` run with BITNET_JAX_CPU_AMX=0, which our kernels read at every call."""
    def run(state, batch_data):
        before = os.environ.get(cpu_int8.AMX_ENV)
        os.environ[cpu_int8.AMX_ENV] = "0"
        try:
            out = train_step(state, batch_data)
            jax.block_until_ready(out)
            return out
        finally:
            if before is None:
                del os.environ[cpu_int8.AMX_ENV]
            else:
                os.environ[cpu_int8.AMX_ENV] = before
    return run


def _compiled_step(config, precision, integer, int8_backward, batch, seq_len, options):
    model = Transformer(config, get_recipe(precision), integer=integer,
                        int8_backward=int8_backward)
    optimizer = optim.make_optimizer(OptimizerConfig(warmup_steps=1), total_steps=1000)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0,
                                config.vocab_size)
    batch_data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = nn.unbox(model.init(jax.random.PRNGKey(0), batch_data["inputs"][:1])["params"])
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    train_step = jax.jit(make_train_step(model, optimizer, grad_accum=1), donate_argnums=0,
                         compiler_options=options)
    state, metrics = train_step(state, batch_data)
    jax.block_until_ready(metrics)
    return train_step, state, batch_data


def interleaved_step_times(steps: dict, rounds: int, kernel_usage: Optional[dict] = None
                           ) -> dict:
    """Seconds of every step of each mode, timing one step of every mode per round.

    `kernel_usage`, if given, receives per mode the (page faults, system seconds) of every step,
    from `getrusage`: time the process spent in the kernel rather than computing (glibc's
    malloc faulted in 426 MiB per ladder-1.6m step: `bitnet_jax/allocator.py`).

    Round-robin rather than one mode after the other: on a shared machine the load changes
    over minutes, and interleaving exposes every mode to the same load, which keeps the ratios
    honest (sequential blocks gave ratios 15% apart between two runs; measured). The order
    rotates from round to round, so that every mode takes every place equally often.
    """
    samples = {mode: [] for mode in steps}
    order = list(steps)
    for round_index in range(rounds):
        # Each round starts one mode later: a mode's place in the round matters (the bf16-null
        # mode, always right after bf16, came out 1.024x [1.010, 1.066] at ladder-6.4m).
        shift = round_index % len(order)
        for mode in order[shift:] + order[:shift]:
            train_step, state, batch_data = steps[mode]
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            state, metrics = train_step(state, batch_data)
            jax.block_until_ready(metrics)
            samples[mode].append(time.perf_counter() - start)
            if kernel_usage is not None:
                after = resource.getrusage(resource.RUSAGE_SELF)
                kernel_usage.setdefault(mode, []).append(
                    (after.ru_minflt - usage.ru_minflt, after.ru_stime - usage.ru_stime))
            steps[mode] = (train_step, state, batch_data)
    return samples


def paired_ratio(times: list, baseline_times: list, confidence: float = 0.95) -> tuple:
    """(median, low, high) of the per-round ratios times[r] / baseline_times[r], with a
    percentile bootstrap interval of the median (scipy.stats.bootstrap).

    Paired by round: the two steps of a round ran under the same load, so their ratio cancels
    most of the machine's drift that the ratio of two medians keeps.
    """
    ratios = np.asarray(times) / np.asarray(baseline_times)
    if len(ratios) < 2 or np.all(ratios == ratios[0]):
        return float(np.median(ratios)), float(ratios.min()), float(ratios.max())
    interval = scipy.stats.bootstrap((ratios,), np.median, confidence_level=confidence,
                                     method="percentile", n_resamples=2000,
                                     random_state=np.random.default_rng(0)).confidence_interval
    return float(np.median(ratios)), float(interval.low), float(interval.high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="ladder-1.6m,ladder-6.4m,ladder-20m")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help=f"comma-separated, bf16 first; from {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per mode (rounds of one step of every mode)")
    parser.add_argument("--peak-size", type=int, default=2048,
                        help="matmul size for the measured bf16 peak")
    parser.add_argument("--out", default="bench_train.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if modes[0] != "bf16" or not set(modes) <= set(MODES):
        parser.error(f"--modes must start with bf16 and name modes from {', '.join(MODES)}")

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "machine": platform.machine(), "malloc": active_allocator(),
            "batch": args.batch, "seq_len": args.seq_len}
    peak = measure_matmul_peak(args.peak_size, repeats=10)
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']} / {meta['malloc']} malloc; "
          f"batch {args.batch} x "
          f"{args.seq_len} tokens; measured bf16 matmul peak {peak / 1e12:.3f} TFLOP/s")
    header = (f"{'preset':>12} {'mode':>18} {'step ms':>9} {'sys ms':>7} {'tokens/s':>10} "
              f"{'MFU':>6} {'vs bf16 [95%]':>21}")
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for preset in args.presets.split(","):
        config = get_model_config(preset)
        flops = compute.flops_per_token(config, "causal", args.seq_len) * args.batch * args.seq_len
        steps, compile_s = {}, {}
        for mode in modes:  # minutes each on a GPU: say where a run cut off by a time limit was
            start = time.perf_counter()
            steps[mode] = compiled_step(preset, MODES[mode], args.batch, args.seq_len)
            compile_s[mode] = time.perf_counter() - start
            print(f"# {preset} {mode}: compiled and ran a first step in {compile_s[mode]:.1f} s",
                  file=sys.stderr, flush=True)
        kernel_usage = {}
        samples = interleaved_step_times(steps, args.steps, kernel_usage)
        del steps
        for mode in modes:
            seconds = statistics.median(samples[mode])
            faults, system_s = (statistics.median(column) for column in zip(*kernel_usage[mode]))
            ratio, low, high = paired_ratio(samples[mode], samples["bf16"])
            row = {"preset": preset, "mode": mode, "step_s": seconds,
                   "tokens_per_s": args.batch * args.seq_len / seconds,
                   "mfu_vs_measured_peak": flops / seconds / peak,
                   "vs_bf16": ratio, "vs_bf16_interval": [low, high],
                   "compile_and_first_step_s": compile_s[mode],
                   # whole process, all threads: not a share of the step's wall time
                   "page_faults_per_step": faults, "system_s_per_step": system_s,
                   "step_s_per_round": samples[mode]}
            rows.append(row)
            print(f"{preset:>12} {mode:>18} {seconds * 1e3:9.1f} {system_s * 1e3:7.1f} "
                  f"{row['tokens_per_s']:10.0f} {row['mfu_vs_measured_peak']:6.1%} "
                  f"{ratio:7.3f} [{low:.3f}, {high:.3f}]", flush=True)
        with open(args.out, "w") as f:  # after every preset: a cut-off run keeps what it measured
            json.dump({"meta": meta, "peak_flops": peak, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    raise SystemExit(main())
