"""BitNet b1.58's weight quantization in one pass on x86 CPUs: int8 codes and gamma from one call.

`quant.ternary_absmean` (gamma = max(mean|W|, 1e-5), codes = RoundClip(W / gamma, -1, 1)) is a
reduction and an elementwise pass, two operations of the compiled step per linear layer. On CPUs the
pair costs more than the passes themselves: with gamma a compile-time constant (one operation) the
ternary step of ladder-6.4m ran 5% faster on a 2-core Xeon, and so did the step with both passes in
one custom call, this one (docs/cpu_training_step_history.md: 1.013x to 0.958x the bf16 step),
although each pass takes tens of microseconds; our reading is that every extra operation runs
concurrently with the products and slows them. The entry point lives in `cpu_int8`'s library
(`kernels/ternary_absmean.cc`), built and registered with it::

    available() -> bool
    applies(quantize_w, w) -> bool       # per-tensor ternary quantizer, float32 2-D weight
    ternary_absmean(w) -> Quantized      # int8 codes, float32 gamma (a scalar)

The codes are the formula's for the gamma the kernel computes, bit for bit. gamma is the sum of
|W| taken in float64 (fixed blocks, fixed order: the same on any number of threads), rounded
once to float32 and multiplied by the float32 reciprocal of the size, as XLA compiles the mean
of its own float32 sum. Where XLA's float32 sum is exact (`codec.exact_latent`'s weights) that
is XLA's gamma; elsewhere XLA's sum, in an order of its own, can differ from it in the last
bits, so a step with this kernel is not always bit-identical to one without it (the same recipe,
a rounding apart). Stored weights and exports take their codes from the same function as the
forward (`matmul.quantize_weight`).

Under GSPMD a replicated weight runs the kernel on every device; a sharded one (tensor
parallelism) is not gathered: each device sums |W| over its shard, one `psum` gives the mean,
and XLA writes the shard's codes (`custom_partitioning`). Under `vmap` the call runs one batch
element at a time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax.core import cpu_int8, cpu_int8_fused
from bitnet_jax.core.cpu_int8 import TERNARY_ABSMEAN_TARGET
from bitnet_jax.core.quant import EPS, F32, Quantized, ternary_round


def available() -> bool:
    """Whether the kernel can be used: it is registered with `cpu_int8`'s."""
    return cpu_int8.available()


def applies(quantize_w, w: jax.Array) -> bool:
    """Whether `ternary_absmean` computes what `quantize_w(w)` does: a ternary quantizer with
    one scale per tensor, on a float32 2-D weight, with the kernel available."""
    return (getattr(quantize_w, "kind", None) == "ternary"
            and getattr(quantize_w, "granularity", None) == "tensor"
            and w.dtype == F32 and w.ndim == 2 and available())


def _local(w):
    out = (jax.ShapeDtypeStruct(w.shape, jnp.int8), jax.ShapeDtypeStruct((), F32))
    return jax.ffi.ffi_call(TERNARY_ABSMEAN_TARGET, out)(w)


def _mesh_axes_of(spec) -> tuple:
    return tuple(axis for entry in spec for axis in cpu_int8.mesh_axes(entry))


def _shardings(mesh, arg_shapes):
    """(the weight's and its codes' sharding, gamma's: replicated)."""
    return (NamedSharding(mesh, P(*arg_shapes[0].sharding.spec)), NamedSharding(mesh, P()))


def _partition(mesh, arg_shapes, result_shape):
    codes, gamma = _shardings(mesh, arg_shapes)
    axes = _mesh_axes_of(codes.spec)
    if not axes:
        return mesh, _local, (codes, gamma), (codes,)
    size = math.prod(arg_shapes[0].shape)

    def lower(w_shard):  # the formula on this device's shard, the sum completed by one psum
        g = jnp.maximum(jax.lax.psum(jnp.sum(jnp.abs(w_shard)), axes) / size, EPS)
        return ternary_round(w_shard, g).astype(jnp.int8), g

    return mesh, lower, (codes, gamma), (codes,)


def _infer(mesh, arg_shapes, result_shape):
    return _shardings(mesh, arg_shapes)


_partitioned = custom_partitioning(_local)
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="i j -> i j, ")


def ternary_absmean(w: jax.Array) -> Quantized:
    """`quant.ternary_absmean(w)` per tensor, as int8 codes and a float32 scalar gamma, in one
    pass of our kernel. Needs `applies(quantize_w, w)`."""
    if w.dtype != F32 or w.ndim != 2:
        raise ValueError(f"cpu_ternary.ternary_absmean wants a float32 2-D weight, got "
                         f"{w.dtype} {w.shape}")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: "
                           f"{cpu_int8.unavailable_reason()}")
    codes, gamma = cpu_int8_fused.one_batch_element_at_a_time(_partitioned, w)
    return Quantized(codes, gamma)
