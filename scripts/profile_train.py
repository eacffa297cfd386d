"""Where a training step's device time goes: each mode's step traced, its kernels summed by name.

Compiles the trainer's step for one preset in each mode (the modes of `bench_train.py`), runs it
twice, then traces `--steps` steps with the JAX profiler and sums the device time of every
kernel (on a GPU: the CUDA kernels on its streams) or XLA op (on a CPU: the ops that the
runtime's threads executed, side by side, so the sum can exceed the wall time; each op counts
once, on the thread that started it, though XLA's products and our kernels' custom calls take
every thread of the pool: in jax 0.10.2's traces each op appears once a step). Prints, per mode
and step: the device-busy time, the number of kernels launched, the time in matrix products and
in attention (by the GPU kernels' names: cuBLAS, Triton GEMM fusions, cuDNN attention), the time
kernels ran alone (no other kernel running: on a CPU XLA runs independent ops side by side, so
this, not the busy time, is where a step's wall time goes; `alone_micros`), the trace's span per
step and the traced steps' page faults and system time (a line names the modes with over 10,000
faults a step, whose ops run slower for it); and then, for every mode after the first, the
kernel families (names less their numeric suffix) whose time differs most from the first mode's:
what a recipe adds or saves, with the time each ran alone. `--by op` compares model operations
instead (each op's HLO op_name, as `mlp/jit(silu)/mul` under `layers_*`, every layer's one
name): which line of the model a family's time comes from. Writes JSON (default
`profile_train.json`) with every family's and every model operation's time.

    python scripts/profile_train.py [--preset ladder-20m] [--modes bf16,b1.58,b1.58-int8]
                                    [--batch 16] [--seq-len 256] [--steps 2] [--by op]
                                    [--out FILE]

Measured this way on an H200 (README, Benchmarks): what b1.58 adds to a bf16 step of
b1.58-700m, and which kernels it is.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import resource
import sys
import tempfile
import time
from typing import NamedTuple

import jax

from bitnet_jax.allocator import active_allocator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the modes and the compiled step, one home for both)

# GPU kernel names: cuBLAS (nvjet, cutlass, xmma), XLA's Triton GEMM fusions; cuDNN (attention,
# the only cuDNN work in a step, with its helper kernels).
_MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.IGNORECASE)
_ATTENTION = re.compile(r"sdpa|fmha|flash|cudnn|dot_product_attention", re.IGNORECASE)


def kernel_class(name: str) -> str:
    """"matmul", "attention" or "other", from a kernel's name (GPU names; on CPUs XLA's
    fusions hide what they hold, so their ops count as "other")."""
    if _ATTENTION.search(name):
        return "attention"
    return "matmul" if _MATMUL.search(name) else "other"


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """Each custom call instruction's target: on a CPU the trace names every custom call
    `ffi_call.N` or `custom-call.N`, which says nothing of which kernel ran."""
    return dict(re.findall(r'%?([\w.\-]+) = [^\n]*?custom-call\([^\n]*?'
                           r'custom_call_target="([^"]+)"', hlo_text))


def named_custom_calls(kernels: list[Kernel], hlo_text: str) -> list[Kernel]:
    """`kernels` with each custom call named by its target (`custom_call_targets`)."""
    targets = custom_call_targets(hlo_text)
    return [k._replace(name=targets[k.name]) if k.name in targets else k for k in kernels]


def family(name: str) -> str:
    """A kernel's name less its numeric suffix: XLA numbers each fusion of a kind."""
    return re.sub(r"[._]\d+$", "", name)


# Parts of an HLO op_name that say where the step's code ran, not what the model computes: the
# jitted step itself, the grad-accumulation loop's body, `platform_dependent`'s branches, and
# Flax's method scopes (`Transformer.logits_from_embeddings/`: a class and a method; the
# modules' names stay).
_WRAPPERS = re.compile(r"^jit\([^/]*\)/|while/body/|closed_call/|cond/branch_\d+_fun/"
                       r"|(?<=/)[A-Z]\w*\.\w+/")


def model_op(op_name: str) -> str:
    """An HLO op_name as the model operation it computes: the step's wrappers left out and
    layer numbers written `layers_*`, so that the same operation of every layer is one name
    (`transpose(jvp(Transformer))/layers_*/mlp/up_proj/dot_general`: in the backward pass)."""
    return re.sub(r"layers_\d+", "layers_*", _WRAPPERS.sub("", op_name))


def model_ops(kernels: list[Kernel], hlo_text: str) -> list[str]:
    """Each kernel's model operation (`model_op` of its instruction's op_name, with a custom
    call's target after it), or its family where the instruction has no op_name (XLA's own
    copies). Take the kernels before `named_custom_calls` renames them."""
    op_names = {name: model_op(op) for name, op in
                re.findall(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text)}
    targets = custom_call_targets(hlo_text)
    return [op_names.get(k.name, family(k.name))
            + (f" [{targets[k.name]}]" if k.name in targets else "") for k in kernels]


# Page faults per traced step above which a mode's op times are suspect (`traced_step_kernels`).
# The profiler's own buffers fault in some: 800-1,500 a step at ladder-1.6m, ~5,000 at 6.4m,
# where the slow profiles of 2026-12-06 had 7,000-44,000 (a 2-core AMD EPYC).
FAULTS_WORTH_A_WARNING = 10_000


class Kernel(NamedTuple):
    name: str
    micros: float
    start: float  # microseconds, on the trace's clock


def device_kernels(trace: dict) -> list[Kernel]:
    """Every kernel or XLA op a perfetto trace holds, with its duration and start.

    A GPU's kernels are the events of its device tracks; on a CPU the ops are the events that
    name their HLO module (the runtime's own regions, such as the thunk executor's, do not)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in processes.items() if name.startswith("/device:")}
    kernels = []
    for event in events:
        if event.get("ph") != "X":
            continue
        if (event["pid"] in device_pids if device_pids
                else "hlo_module" in event.get("args", {})):
            kernels.append(Kernel(event["name"], float(event.get("dur", 0.0)),
                                  float(event.get("ts", 0.0))))
    return kernels


def alone_micros(kernels: list[Kernel], labels: list | None = None
                 ) -> tuple[collections.Counter, float]:
    """(microseconds each kernel name (or its entry of `labels`, as its index) ran with no
    other kernel running, the microseconds from the first start to the last end).

    XLA:CPU runs independent ops side by side on its threads, so a CPU step's wall time is not
    the sum of its ops: an op that runs alone is on the step's critical path, one beside others
    shares the cores with them (docs/cpu_training_step_history.md: the forward's ops run alone,
    the weight gradients beside the input gradients' chain). On a GPU's one stream every kernel runs
    alone. A sweep over the starts and ends; an end and a start at one instant do not overlap.
    """
    alone = collections.Counter()
    if not kernels:
        return alone, 0.0
    edges = sorted([(k.start, 1, i) for i, k in enumerate(kernels)]
                   + [(k.start + k.micros, 0, i) for i, k in enumerate(kernels)])
    running, previous = set(), edges[0][0]
    for time_us, is_start, index in edges:
        if len(running) == 1:
            index_alone = next(iter(running))
            alone[labels[index_alone] if labels is not None else kernels[index_alone].name] += \
                time_us - previous
        previous = time_us
        if is_start:
            running.add(index)
        else:
            running.discard(index)
    return alone, edges[-1][0] - edges[0][0]


def summarize(kernels: list[Kernel], steps: int, ops: list[str] | None = None) -> dict:
    """Per step: busy milliseconds, kernel count, milliseconds per class and per family, the
    milliseconds kernels ran alone (in all and per family) and the trace's span; with `ops`
    (each kernel's `model_ops` entry), milliseconds, counts and milliseconds alone per model
    operation too."""
    by_class = collections.Counter({"matmul": 0.0, "attention": 0.0, "other": 0.0})
    for kernel in kernels:
        by_class[kernel_class(kernel.name)] += kernel.micros / 1e3 / steps
    alone, span = alone_micros(kernels, list(range(len(kernels))))  # per kernel, one sweep
    family_ms, family_count, family_alone = _grouped(
        [family(kernel.name) for kernel in kernels], kernels, alone, steps)
    summary = {"busy_ms": sum(by_class.values()), "kernels": len(kernels) / steps,
               "class_ms": dict(by_class), "family_ms": family_ms, "family_count": family_count,
               "alone_ms": sum(family_alone.values()), "span_ms": span / 1e3 / steps,
               "family_alone_ms": family_alone}
    if ops is not None:
        summary["op_ms"], summary["op_count"], summary["op_alone_ms"] = _grouped(
            ops, kernels, alone, steps)
    return summary


def _grouped(keys: list, kernels: list[Kernel], alone: collections.Counter, steps: int
             ) -> tuple[dict, dict, dict]:
    """(milliseconds, count, milliseconds alone) per step of each key, `keys[i]` being kernel
    i's and `alone` the microseconds alone per kernel index (`alone_micros`)."""
    ms, count, alone_ms = collections.Counter(), collections.Counter(), collections.Counter()
    for key, kernel in zip(keys, kernels):
        ms[key] += kernel.micros / 1e3 / steps
        count[key] += 1 / steps
    for index, micros in alone.items():
        alone_ms[keys[index]] += micros / 1e3 / steps
    return dict(ms.most_common()), dict(count), dict(alone_ms.most_common())


def family_differences(summary: dict, baseline: dict, top: int, by: str = "family"
                       ) -> list[tuple]:
    """(name, ms difference, count difference, ms, baseline ms, ms alone, baseline ms alone)
    of the `top` kernel families (or, with `by="op"`, model operations) whose time differs
    most between `summary` and `baseline`, largest first."""
    ms, count, alone = summary[f"{by}_ms"], summary[f"{by}_count"], summary[f"{by}_alone_ms"]
    base_ms, base_count = baseline[f"{by}_ms"], baseline[f"{by}_count"]
    base_alone = baseline[f"{by}_alone_ms"]
    rows = [(name, ms.get(name, 0.0) - base_ms.get(name, 0.0),
             count.get(name, 0) - base_count.get(name, 0), ms.get(name, 0.0),
             base_ms.get(name, 0.0), alone.get(name, 0.0), base_alone.get(name, 0.0))
            for name in set(ms) | set(base_ms)]
    return sorted(rows, key=lambda row: -abs(row[1]))[:top]


def faulted_modes(summaries: dict) -> list[str]:
    """The modes whose traced steps faulted in more than FAULTS_WORTH_A_WARNING pages a step."""
    return [mode for mode, summary in summaries.items()
            if summary["page_faults_per_step"] > FAULTS_WORTH_A_WARNING]


def traced_step_kernels(step, steps: int, trace_dir: str,
                        kernel_usage: list | None = None) -> list[Kernel]:
    """The kernels of `steps` traced steps of a compiled step (`bench_train.compiled_step`).

    `kernel_usage`, if given, receives the (page faults, system seconds) of the traced steps,
    from `getrusage`. They matter here: ops that touch freshly faulted pages run several times
    slower (2026-12-06, a 2-core AMD EPYC: in one profile the ladder-6.4m norms' elementwise
    fusions took 0.5-0.9 ms, in another with few faults 0.09-0.14 ms). Steps faulted in
    7,000-44,000 pages each in processes that had run another mode before (tcmalloc returns
    freed spans to the kernel) and now and then in fresh ones, so that a mode's ops can look
    slow for reasons that are not its own."""
    train_step, state, batch_data = step
    for _ in range(2):  # past the first steps' one-off work (autotuning, allocations)
        state, metrics = train_step(state, batch_data)
        jax.block_until_ready(metrics)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = train_step(state, batch_data)
            jax.block_until_ready(metrics)
    after = resource.getrusage(resource.RUSAGE_SELF)
    if kernel_usage is not None:
        kernel_usage.append((after.ru_minflt - usage.ru_minflt, after.ru_stime - usage.ru_stime))
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path, "rt") as f:
        return device_kernels(json.load(f))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ladder-20m")
    parser.add_argument("--modes", default=bench_train.DEFAULT_MODES,
                        help=f"comma-separated, the first is the reference; from "
                             f"{', '.join(bench_train.MODES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="traced steps per mode")
    parser.add_argument("--top", type=int, default=12,
                        help="kernel families listed per mode against the first")
    parser.add_argument("--by", choices=("family", "op"), default="family",
                        help="compare modes by kernel family, or by model operation (each op's "
                             "HLO op_name, every layer's as one: `model_ops`)")
    parser.add_argument("--out", default="profile_train.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(bench_train.MODES):
        parser.error(f"--modes must name modes from {', '.join(bench_train.MODES)}")

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "malloc": active_allocator(), "preset": args.preset,
            "batch": args.batch, "seq_len": args.seq_len, "traced_steps": args.steps}
    print(f"# {meta['backend']} / {meta['device']} / jax {meta['jax']} / {meta['malloc']} malloc; "
          f"{args.preset}, batch "
          f"{args.batch} x {args.seq_len} tokens; device time per step")
    summaries = {}
    for mode in modes:
        step = bench_train.compiled_step(args.preset, bench_train.MODES[mode], args.batch,
                                         args.seq_len)
        train_step, state, batch_data = step
        hlo_text = train_step.lower(state, batch_data).compile().as_text()
        usage = []
        with tempfile.TemporaryDirectory() as trace_dir:
            kernels = traced_step_kernels(step, args.steps, trace_dir, usage)
        if not kernels:
            # Seen where libtpu had been loaded into the process before (a TPU AOT compile):
            # its profiler then records no XLA:CPU ops.
            raise SystemExit(f"profile_train: the trace of {mode} holds no kernels or XLA ops; "
                             "run it in a fresh process")
        summaries[mode] = summarize(named_custom_calls(kernels, hlo_text), args.steps,
                                    model_ops(kernels, hlo_text))
        (faults, system_s), = usage
        summaries[mode].update(page_faults_per_step=faults / args.steps,
                               system_ms_per_step=system_s * 1e3 / args.steps)
        del step
        print(f"# {mode}: traced", file=sys.stderr, flush=True)

    header = (f"{'mode':>18} {'busy ms':>9} {'kernels':>8} {'matmul ms':>10} "
              f"{'attention ms':>13} {'other ms':>9} {'alone ms':>9} {'span ms':>8} "
              f"{'faults':>7} {'sys ms':>7}")
    print(header)
    print("-" * len(header))
    for mode, summary in summaries.items():
        classes = summary["class_ms"]
        print(f"{mode:>18} {summary['busy_ms']:9.2f} {summary['kernels']:8.0f} "
              f"{classes['matmul']:10.2f} {classes['attention']:13.2f} {classes['other']:9.2f} "
              f"{summary['alone_ms']:9.2f} {summary['span_ms']:8.2f} "
              f"{summary['page_faults_per_step']:7.0f} {summary['system_ms_per_step']:7.1f}")
    faulted = faulted_modes(summaries)
    if faulted:
        print(f"# {', '.join(faulted)}: over {FAULTS_WORTH_A_WARNING} page faults a step; "
              "ops touching fresh pages run slower, so compare such modes profiled alone "
              "(--modes MODE)")
    reference = modes[0]
    for mode in modes[1:]:
        rows = family_differences(summaries[mode], summaries[reference], args.top, args.by)
        what = "kernel families" if args.by == "family" else "model operations"
        # Families cut to 40 characters, as ever; model operations whole (the pass is at the
        # start of the name, the layer's part and our kernel's name at its end).
        width = 40 if args.by == "family" else max([len(row[0]) for row in rows] + [2])
        print(f"\n{mode} against {reference}: the {what} that differ most "
              f"(ms alone: with no other kernel running)")
        print(f"{args.by:>{width}} {'diff ms':>8} {'diff n':>7} {'ms':>8} "
              f"{reference + ' ms':>12} {'ms alone':>9} {reference + ' alone':>14}")
        for name, diff, count, ms, base, alone, base_alone in rows:
            print(f"{name[:width]:>{width}} {diff:+8.2f} {count:+7.0f} {ms:8.2f} {base:12.2f} "
                  f"{alone:9.2f} {base_alone:14.2f}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "modes": summaries}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from bitnet_jax.platforms import prepare_process

    prepare_process(sys.argv)  # as the CLI: libtpu quiet without TPUs, tcmalloc if installed
    raise SystemExit(main())
