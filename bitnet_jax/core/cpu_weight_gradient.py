"""The weight gradient's bf16 product X^T G on AMX tiles or AVX512-BF16 vectors
(`kernels/weight_gradient.cc`).

    weight_gradient_dot(x_t, g) -> float32 (P, N)   # x_t (P, M) bf16 = X^T, g (M, N) bf16
    quantized_weight_gradient(x, mult, scale, g, lo, hi) -> float32 (P, N)
        # X_q^T G with X_q = bf16(clip(round(x * mult), lo, hi) * scale) per row of x (M, P):
        # `cpu_int8_fused.quantize_transpose`'s X_q^T and the product in one call, the same bits

XLA:CPU's bf16 dot (YNNPACK) ran this product at 0.35-0.45 TFLOP/s in the ladder presets' training
steps on a 2-core Xeon with AMX (2026-12-05), about a third of what the tiles give it at large
square shapes; the weight gradients are the largest product time of a ternary training step once the
forward and input-gradient products are int8. Alone, `weight_gradient_dot` takes 0.72-0.86x the time
of XLA's dot at those shapes and `quantized_weight_gradient` 0.52-0.73x that of `quantize_transpose`
and XLA's dot; in the step both quantized paths take the latter, 2-4% off the step at ladder-6.4m
and 20m (docs/cpu_training_step_history.md). The sums run in m's order, one float32 accumulator per
output, as XLA's own product runs them (bit for bit XLA's dot on that Xeon, on tiles, and on a
2-core AMD EPYC, on vectors); subnormal inputs count as zero, as in both instructions. Usable where
`cpu_int8.bf16_products` names a place: our kernels on AMX tiles, or a CPU with AVX512-BF16 and no
AMX. Built and registered with `cpu_int8`'s library.

Under GSPMD the product is partitioned like `cpu_int8.int8_dot`: rows of x_t and columns of g
keep their splits, and a contraction split alike on both is summed with one `psum` (the
data-parallel weight gradient: each device's rows, then the sum XLA would take anyway).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax.core import cpu_int8
from bitnet_jax.core.cpu_int8 import QUANTIZED_WEIGHT_GRADIENT_TARGET, WEIGHT_GRADIENT_DOT_TARGET
from bitnet_jax.core.cpu_int8_fused import one_batch_element_at_a_time


def available() -> bool:
    """Whether this module's products run here, with XLA's bits: `cpu_int8.bf16_products`."""
    return cpu_int8.bf16_products() is not None


def _local(x_t, g):
    out = jax.ShapeDtypeStruct((x_t.shape[0], g.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(WEIGHT_GRADIENT_DOT_TARGET, out)(x_t, g)


def _quantized_local(x, mult, scale, g, lo, hi):
    out = jax.ShapeDtypeStruct((x.shape[1], g.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(QUANTIZED_WEIGHT_GRADIENT_TARGET, out)(
        x, mult, scale, g, lo=np.int32(lo), hi=np.int32(hi))


def _specs(arg_shapes):
    """Mesh axes of (x_t's rows, g's columns, the contraction m) for x_t (P, M) and g (M, N),
    split as `cpu_int8.dot_axes` splits a product of x (rows, k) and w (rows, k): g is w
    transposed."""
    x_t = cpu_int8.matrix_spec(arg_shapes[0].sharding)
    m_g, n = cpu_int8.matrix_spec(arg_shapes[1].sharding)
    return cpu_int8.dot_axes(x_t, (n, m_g))


def _quantized_specs(arg_shapes):
    """The same for x (M, P), whose transpose is the left operand, and g (M, N)."""
    m, p = cpu_int8.matrix_spec(arg_shapes[0].sharding)
    m_g, n = cpu_int8.matrix_spec(arg_shapes[3].sharding)
    return cpu_int8.dot_axes((p, m), (n, m_g))


def _partition(mesh, arg_shapes, result_shape):
    p, n, m = _specs(arg_shapes)

    def lower(x_t, g):
        out = _local(x_t, g)
        return jax.lax.psum(out, m) if m else out

    return (mesh, lower, NamedSharding(mesh, P(p, n)),
            (NamedSharding(mesh, P(p, m)), NamedSharding(mesh, P(m, n))))


def _infer(mesh, arg_shapes, result_shape):
    p, n, _ = _specs(arg_shapes)
    return NamedSharding(mesh, P(p, n))


_partitioned = custom_partitioning(_local)
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="p m, m n -> p n")


def _quantized_partition(lo, hi, mesh, arg_shapes, result_shape):
    p, n, m = _quantized_specs(arg_shapes)

    def lower(x, mult, scale, g):
        out = _quantized_local(x, mult, scale, g, lo, hi)
        return jax.lax.psum(out, m) if m else out

    rows = NamedSharding(mesh, P(m))
    return (mesh, lower, NamedSharding(mesh, P(p, n)),
            (NamedSharding(mesh, P(m, p)), rows, rows, NamedSharding(mesh, P(m, n))))


def _quantized_infer(lo, hi, mesh, arg_shapes, result_shape):
    p, n, _ = _quantized_specs(arg_shapes)
    return NamedSharding(mesh, P(p, n))


_quantized_partitioned = custom_partitioning(_quantized_local, static_argnums=(4, 5))
_quantized_partitioned.def_partition(partition=_quantized_partition,
                                     infer_sharding_from_operands=_quantized_infer,
                                     sharding_rule="m p, m, m, m n -> p n")


def _require():
    if not available():
        raise RuntimeError("the weight gradient's kernel needs our kernels on AMX tiles or "
                           f"AVX512-BF16 vectors: {cpu_int8.bf16_products_missing()}")


def weight_gradient_dot(x_t: jax.Array, g: jax.Array) -> jax.Array:
    """x_t (P, M) @ g (..., N) -> float32 (P, N), g's leading axes the M rows: dW = X^T G from
    X^T laid out row-major. Needs `available()`."""
    if x_t.dtype != jnp.bfloat16 or g.dtype != jnp.bfloat16:
        raise TypeError(f"weight_gradient_dot wants bf16 operands, got {x_t.dtype} and "
                        f"{g.dtype}")
    g2 = g.reshape(-1, g.shape[-1])
    if x_t.ndim != 2 or x_t.shape[1] != g2.shape[0]:
        raise ValueError(f"weight_gradient_dot: x_t {x_t.shape} and g {g.shape} (want x_t "
                         f"(P, M), g (..., N) with M rows)")
    _require()
    return one_batch_element_at_a_time(_partitioned, x_t, g2)


def quantized_weight_gradient(x: jax.Array, mult: jax.Array, scale: jax.Array, g: jax.Array,
                              lo: int, hi: int) -> jax.Array:
    """X_q^T G -> float32 (P, N) for bf16 x (..., P) and g (..., N) with the same leading
    axes (the M rows), X_q = bf16(clip(round(x * mult), lo, hi) * scale) with one float32
    mult and scale per row (shape x.shape[:-1], or with a trailing 1): the numbers of
    `weight_gradient_dot(quantize_transpose(x, mult, scale, lo, hi), g)`, bit for bit,
    without writing X_q^T. Needs `available()`."""
    if x.dtype != jnp.bfloat16 or g.dtype != jnp.bfloat16:
        raise TypeError(f"quantized_weight_gradient wants bf16 x and g, got {x.dtype} and "
                        f"{g.dtype}")
    if x.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"quantized_weight_gradient: x {x.shape} and g {g.shape} want the "
                         f"same leading axes (the rows)")
    rows = math.prod(x.shape[:-1])
    _require()
    return one_batch_element_at_a_time(
        lambda *a: _quantized_partitioned(*a, lo, hi), x.reshape(rows, x.shape[-1]),
        mult.reshape(rows).astype(jnp.float32), scale.reshape(rows).astype(jnp.float32),
        g.reshape(rows, g.shape[-1]))
