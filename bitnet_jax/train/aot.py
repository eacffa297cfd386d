"""Compile a run's train step ahead of time for devices that need not be here; report its memory.

`compile_train_step(config, devices)` builds the step from the config alone (`loop.abstract_setup`:
no data, no device memory), lowers it with abstract arguments in their shardings and compiles it;
XLA's memory and cost analyses then say how many bytes each device needs and how many FLOPs it
runs. `devices` are the local devices, or those of a libtpu topology (`topology_devices("v5e:16x16")`)
compiled for on a CPU-only machine, as MaxText's `train_compile.py` does.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from bitnet_jax.config import RunConfig
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.resolve import ResolvedRun
from bitnet_jax.train.loop import abstract_setup, compile_steps

GIB = 1 << 30
# High-bandwidth memory per device, by `device.device_kind` (Cloud TPU system architecture pages).
DEVICE_MEMORY_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
}


def topology_devices(topology: Optional[str]) -> list:
    """The local devices (None), or the abstract devices of a TPU slice such as `v5e:16x16`."""
    if topology is None:
        return list(jax.devices())
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off Cloud TPU VMs
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as error:  # noqa: BLE001 - libtpu missing or an unknown topology name
        raise ConfigError(
            f"--topology {topology}: cannot describe it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); install libtpu with "
            f"pip install -e '.[tpu]' and use a name such as v5e:16x16, v5p:4x4x4 or "
            f"v4:2x2x4") from None


def device_memory_bytes(device) -> int:
    """Memory of one device: the TPU table, else what the runtime reports, else host RAM (CPU)."""
    if device.device_kind in DEVICE_MEMORY_BYTES:
        return DEVICE_MEMORY_BYTES[device.device_kind]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - abstract or CPU devices may not report
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # CPU devices share host RAM


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What one device needs for one train step, and what it computes."""

    devices: int
    device_kind: str
    argument_bytes: int  # train state + batch shard (the donated state is reused by the output)
    temporary_bytes: int  # activations kept for the backward pass, gradients, workspace
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    device_bytes: int
    flops_per_device: Optional[float]  # None when the compiler gave up (out of memory)
    compile_seconds: float
    error: Optional[str] = None  # the compiler's out-of-memory message, when it gave one

    @property
    def total_bytes(self) -> int:
        """Peak bytes per device: arguments and temporaries, plus outputs that do not reuse a
        donated argument, plus the program."""
        return (self.argument_bytes + self.temporary_bytes + self.output_bytes
                - self.alias_bytes + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes


def compile_train_step(config: RunConfig | ResolvedRun, devices: Sequence,
                       precision: Optional[str] = None) -> CompiledStep:
    """AOT-compile the train step of `config` (its final precision unless named) for `devices`."""
    setup = abstract_setup(config, devices)
    train_step, _ = compile_steps(setup, precision or setup.config.precision)
    shape = (setup.config.train.batch_size, setup.config.data.seq_len)
    batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
             for key in ("inputs", "targets")}
    device = list(devices)[0]
    tick = time.perf_counter()
    try:
        compiled = train_step.lower(setup.abstract_state, batch).compile()
    except Exception as error:  # noqa: BLE001 - the TPU compiler refuses programs over HBM
        temporaries = _out_of_memory_temporaries(str(error))
        if temporaries is None:
            raise
        return CompiledStep(
            devices=len(devices), device_kind=device.device_kind,
            argument_bytes=_shard_bytes((setup.abstract_state, batch)),
            temporary_bytes=temporaries, output_bytes=0, alias_bytes=0, code_bytes=0,
            device_bytes=device_memory_bytes(device), flops_per_device=None,
            compile_seconds=time.perf_counter() - tick,
            error=str(error).strip().splitlines()[0])
    seconds = time.perf_counter() - tick
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per program
    return CompiledStep(
        devices=len(devices), device_kind=device.device_kind,
        argument_bytes=int(memory.argument_size_in_bytes),
        temporary_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        device_bytes=device_memory_bytes(device),
        flops_per_device=float((cost or {}).get("flops", 0.0)),
        compile_seconds=seconds)


def _shard_bytes(abstract_tree) -> int:
    """Bytes of one device's shards of a tree of abstract arrays with shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(abstract_tree))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# XLA:TPU: "Ran out of memory on HBM, the total memory required for HLO temporaries (71.18G)
# exceeds available HBM (15.75G)." The planner still wants the number, not the failure.
_OOM_TEMPORARIES = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _out_of_memory_temporaries(message: str) -> Optional[int]:
    match = _OOM_TEMPORARIES.search(message)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])
