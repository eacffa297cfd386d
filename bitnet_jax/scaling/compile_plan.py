"""`bitnet sweep plan --compile`: every run's train step compiled for its target, before submission.

One row per run: bytes per device (arguments, temporaries, total) against the device's memory,
compiled FLOPs against the analytic count (`model.accounting`), compile seconds, and whether it
fits. The compiled FLOPs are XLA's count, which does not see inside custom calls: compiled for
a local CPU with our kernels, the quantized steps' products that run in them (`core/cpu_*.py`)
are not in it. The target is a libtpu topology (`v5e:16x16`, compiled here on a CPU machine) or
the local devices.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from bitnet_jax.model import accounting
from bitnet_jax.scaling.sweep import Sweep
from bitnet_jax.train import aot

GIB = float(1 << 30)


def compile_plan(sweep: Sweep, topology: Optional[str] = None) -> list[dict]:
    """One row per run (the keys of `bitnet sweep plan --compile --json`)."""
    devices = aot.topology_devices(topology)
    rows = []
    for index, run in enumerate(sweep.runs, 1):
        config, model = run.config, run.resolved.model
        step = aot.compile_train_step(run.resolved, devices)
        print(f"[{index}/{len(sweep.runs)}] compiled {run.run_id} in {step.compile_seconds:.0f}s",
              file=sys.stderr, flush=True)  # minutes per run for pod-sized models
        tokens = config.train.batch_size * config.data.seq_len
        compiled = None if step.flops_per_device is None else step.flops_per_device * step.devices
        rows.append({
            "run": run.run_id, "preset": config.model.preset, "precision": config.precision,
            "topology": topology or f"local:{devices[0].platform}",
            "devices": step.devices, "bytes_per_device": step.total_bytes,
            "device_bytes": step.device_bytes, "fits": step.fits,
            "flops_compiled": compiled,
            # XLA computes the whole score matrix under the causal mask: compare with "full".
            "flops_analytic": accounting.flops_per_token(model, "full", config.data.seq_len)
            * tokens,
            "compile_s": step.compile_seconds,
            "argument_bytes": step.argument_bytes, "temporary_bytes": step.temporary_bytes,
            "scan_layers": getattr(model, "scan_layers", False),
            "remat": getattr(model, "remat", "none"),
            "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
            "error": step.error,
        })
    return rows


def format_compile_plan(sweep: Sweep, rows: list[dict]) -> str:
    header = (f"{'run':<34} {'dev':>4} {'args GiB':>8} {'temp GiB':>8} {'total GiB':>9} "
              f"{'of GiB':>6} {'fits':>4} {'FLOPs comp.':>11} {'analytic':>9} {'compile':>7} "
              f"{'scan':>4} {'remat':>7}")
    lines = [f"sweep {sweep.name}: {len(rows)} runs compiled for {rows[0]['topology'] if rows else '-'}",
             header, "-" * len(header)]
    for row in rows:
        flops = f"{row['flops_compiled']:.3e}" if row["flops_compiled"] is not None else "-"
        lines.append(
            f"{row['run']:<34} {row['devices']:>4} {row['argument_bytes'] / GIB:>8.2f} "
            f"{row['temporary_bytes'] / GIB:>8.2f} {row['bytes_per_device'] / GIB:>9.2f} "
            f"{row['device_bytes'] / GIB:>6.1f} {'yes' if row['fits'] else 'NO':>4} "
            f"{flops:>11} {row['flops_analytic']:>9.3e} {row['compile_s']:>6.1f}s "
            f"{'yes' if row['scan_layers'] else 'no':>4} {row['remat']:>7}")
    misfits = [row for row in rows if not row["fits"]]
    lines.append(f"{len(misfits)} of {len(rows)} runs do NOT fit: "
                 f"{', '.join(row['run'] for row in misfits)}; try {_remedies(misfits)}"
                 if misfits else f"all {len(rows)} runs fit")
    return "\n".join(lines)


def _remedies(misfits: list[dict]) -> str:
    """What to try, leaving out the settings every run that does not fit already has."""
    untried = [setting for setting, tried in (
        ("model.scan_layers=true", all(row["scan_layers"] for row in misfits)),
        ("model.remat=full", all(row["remat"] == "full" for row in misfits))) if not tried]
    return ", ".join(untried + ["a larger train.grad_accum", "more devices"])


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
