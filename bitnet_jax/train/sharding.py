"""Device mesh and logical-axis sharding: one code path for 1 CPU, 8 simulated devices, a pod.

Parameters and key activations carry logical axis names (`embed`, `heads`, `mlp`, `vocab`, `batch`,
...). Rules from the config map them to the mesh axes `data`, `fsdp` and `tensor`; Flax turns
them into `NamedSharding`s and `jax.jit` (GSPMD) partitions the program accordingly.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bitnet_jax.config import MeshConfig
from bitnet_jax.errors import ConfigError, require

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("batch", "length")


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    if name not in environ:
        return None
    try:
        value = int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} is not an integer; set it to a whole "
                          f"number") from None
    require(value >= 0, f"{name}={value} must be 0 or more")
    return value


def _cluster_launched(environ: Mapping[str, str]) -> bool:
    """A multi-process job whose scheduler JAX reads itself: SLURM with several tasks, or a
    Cloud TPU pod slice with several workers."""
    slurm = environ.get("SLURM_JOB_ID") is not None and int(
        environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1
    tpu_hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return slurm or len(tpu_hosts) > 1


def distributed_arguments(environ: Mapping[str, str]) -> Optional[dict]:
    """The keyword arguments of `jax.distributed.initialize` that the environment describes,
    or None for a single-process run.

    - `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
      `JAX_PROCESS_ID`: passed as they are. JAX reads only the address itself, and on CPU and
      plain GPU hosts detects no counts, so they are passed explicitly.
    - SLURM with several tasks, a Cloud TPU pod slice: no arguments; JAX detects the cluster.
    - `BITNET_DISTRIBUTED=1` forces the call (other schedulers JAX detects), `=0` skips it.
    """
    flag = environ.get("BITNET_DISTRIBUTED")
    if flag == "0":
        return None
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    count, index = _int_env(environ, "JAX_NUM_PROCESSES"), _int_env(environ, "JAX_PROCESS_ID")
    if address is None and count is None and index is None:
        return {} if flag == "1" or _cluster_launched(environ) else None
    if not _cluster_launched(environ):
        missing = [name for name, value in (("JAX_COORDINATOR_ADDRESS", address),
                                            ("JAX_NUM_PROCESSES", count),
                                            ("JAX_PROCESS_ID", index)) if value is None]
        require(not missing, f"a multi-process run needs JAX_COORDINATOR_ADDRESS, "
                             f"JAX_NUM_PROCESSES and JAX_PROCESS_ID; set {', '.join(missing)} "
                             f"too (the same address and count on every process)")
    if count is not None and index is not None:
        require(index < count, f"JAX_PROCESS_ID={index} must be below "
                               f"JAX_NUM_PROCESSES={count}")
    arguments = {"coordinator_address": address, "num_processes": count, "process_id": index}
    return {k: v for k, v in arguments.items() if v is not None}


def maybe_initialize_distributed(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Start JAX's multi-host runtime when the environment describes a multi-process job
    (`distributed_arguments`); True when it did (or had already)."""
    arguments = distributed_arguments(os.environ if environ is None else environ)
    if arguments is None:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**arguments)
    return True


def mesh_shape(config: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 resolved; the product must use every device."""
    sizes = [config.data, config.fsdp, config.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        require(n_devices % fixed == 0,
                f"mesh: {n_devices} devices cannot be split into data x fsdp x tensor with the "
                f"fixed sizes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n_devices // fixed
    require(math.prod(sizes) == n_devices,
            f"mesh: data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, "
            f"but there are {n_devices} devices; set one axis to -1 to fill the rest")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with the classic auto-sharded axis types."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(config, len(devices))
    try:  # lays devices out for the interconnect on TPU/GPU
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - e.g. simulated CPU devices; any order works there
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_rules(config: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """Rules as Flax wants them: (logical name, mesh axis | tuple of axes | None)."""
    rules = []
    for entry in config.rules:
        require(isinstance(entry, (list, tuple)) and len(entry) == 2,
                f"mesh.rules entries must be [logical_name, mesh_axis], got {entry!r}")
        name, target = entry
        targets = target if isinstance(target, (list, tuple)) else [target]
        for axis in targets:
            require(axis is None or axis in MESH_AXES,
                    f"mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; axes are "
                    f"{', '.join(MESH_AXES)}")
        rules.append((name, tuple(target) if isinstance(target, list) else target))
    return tuple(rules)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (those dimensions are replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(abstract_params: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (boxed, abstract) Flax parameter tree, as an unboxed tree."""
    logical_specs = nn.get_partition_spec(abstract_params)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(abstract_params))
    return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
                        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def optimizer_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                              params_sharding: Any, mesh: Mesh) -> Any:
    """Optimizer moments shard like their parameters; counters and the rest are replicated."""
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state,
                                 params_sharding,
                                 transform_non_params=lambda _: replicated(mesh))


def with_activation_shardings(fn: Callable, mesh: Mesh, rules) -> Callable:
    """`fn` traced with the logical-axis rules and the mesh in scope, so the model's
    `nn.with_logical_constraint`s become sharding constraints (without both, flax drops them)."""
    @functools.wraps(fn)
    def constrained(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)
    return constrained


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Batches of shape (batch, length) split over the mesh axes that `batch` maps to."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many ways the batch axis is split: the global batch must be a multiple of it."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    names = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return math.prod(mesh.shape[a] for a in names)


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh, rules) -> None:
    divisor = batch_divisor(mesh, rules)
    micro = global_batch // grad_accum
    if micro % divisor:
        raise ConfigError(
            f"train.batch_size={global_batch} (micro-batches of {micro} with "
            f"train.grad_accum={grad_accum}) is not divisible by the {divisor} ways the mesh "
            f"splits the batch (mesh {dict(mesh.shape)}); use a multiple of {divisor}")
    require(global_batch % jax.process_count() == 0,
            f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} "
            f"processes (hosts)")


def global_batch_from_host(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assemble each host's rows into global arrays (also correct on a single process)."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
