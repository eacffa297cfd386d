"""The k-th largest value of each row in one custom call on x86 CPUs.

`order_statistics.kth_largest` bisects on the bits of the values: one compare-and-count pass
per bit, each an operation of XLA's over the whole array (16 for bfloat16: 3.6 ms for 4096 rows
of 256 values on a 2-core Xeon, where a copy of them takes 0.2 ms). `kernels/kth_largest.cc`
runs the same bisection on one row at a time while it is in cache, so it gives the same bits
(the k-th value of `lax.top_k`). The entry points live in `cpu_int8`'s library, built and
registered with it::

    available() -> bool
    applies(values) -> bool          # bfloat16, float16 or float32, the kernel available
    kth_largest(values, k) -> (..., 1)

Under GSPMD each device takes its own rows, each row whole (`custom_partitioning`); under
`vmap` the call runs one batch element at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from bitnet_jax.core import cpu_int8, cpu_int8_fused
from bitnet_jax.core.cpu_int8 import KTH_LARGEST_16_TARGET, KTH_LARGEST_32_TARGET

# The unsigned type whose bits the kernel takes, per float type (bfloat16 and float16 keep
# their sign bit in the same place, so one kernel serves both), and its entry point.
_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16, jnp.dtype(jnp.float16): jnp.uint16,
         jnp.dtype(jnp.float32): jnp.uint32}
_TARGETS = {jnp.dtype(jnp.uint16): KTH_LARGEST_16_TARGET,
            jnp.dtype(jnp.uint32): KTH_LARGEST_32_TARGET}


def available() -> bool:
    """Whether the kernel can be used: it is registered with `cpu_int8`'s."""
    return cpu_int8.available()


def applies(values: jax.Array) -> bool:
    """Whether `kth_largest` takes `values`: bfloat16, float16 or float32 with at least one
    dimension, the kernel available."""
    return jnp.dtype(values.dtype) in _BITS and values.ndim >= 1 and available()


def _local(bits2, k):
    out = jax.ShapeDtypeStruct(bits2.shape[:1], bits2.dtype)
    return jax.ffi.ffi_call(_TARGETS[jnp.dtype(bits2.dtype)], out)(bits2, k=np.int64(k))


def _partition(k, mesh, arg_shapes, result_shape):
    rows, out = cpu_int8_fused.row_shardings(mesh, arg_shapes)
    return mesh, lambda bits2: _local(bits2, k), out, (rows,)


def _infer(k, mesh, arg_shapes, result_shape):
    return cpu_int8_fused.row_shardings(mesh, arg_shapes)[1]


_partitioned = custom_partitioning(_local, static_argnums=(1,))
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="m n -> m", need_replication_factors=("n",))


def kth_largest(values: jax.Array, k: int) -> jax.Array:
    """The k-th largest of each row (last axis) of `values`, shape (..., 1), bit for bit
    `jax.lax.top_k(values, k)[0][..., -1:]`. Needs `applies(values)` and 1 <= k <= n."""
    if jnp.dtype(values.dtype) not in _BITS or values.ndim < 1:
        raise TypeError(f"cpu_order_statistics.kth_largest wants bfloat16, float16 or float32 "
                        f"rows, got {values.dtype} {values.shape}")
    n = values.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: "
                           f"{cpu_int8.unavailable_reason()}")
    bits = jax.lax.bitcast_convert_type(values, _BITS[jnp.dtype(values.dtype)])
    bits = bits.reshape(math.prod(values.shape[:-1]), n)
    found = cpu_int8_fused.one_batch_element_at_a_time(lambda b: _partitioned(b, k), bits)
    return jax.lax.bitcast_convert_type(found, values.dtype).reshape(*values.shape[:-1], 1)
