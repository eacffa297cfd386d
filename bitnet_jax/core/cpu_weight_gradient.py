"""The weight gradient's bf16 product X^T G on AMX tiles (`kernels/weight_gradient.cc`).

    weight_gradient_dot(x_t, g) -> float32 (P, N)   # x_t (P, M) bf16 = X^T, g (M, N) bf16

XLA:CPU's bf16 dot (YNNPACK) ran this product at 0.35-0.45 TFLOP/s at the ladder presets'
shapes on a 2-core Xeon with AMX (2026-12-05), about a third of what the tiles give it at large
square shapes; the weight gradients are the largest product time of a ternary training step
once the forward and input-gradient products are int8 (README, Benchmarks). The sums equal
XLA's up to their order (float32 rounding); subnormal inputs count as zero, as on every AMX
bf16 product. Usable where our kernels run on AMX tiles (`cpu_int8.kernel_uses_amx`; the
kernel refuses otherwise). Built and registered with `cpu_int8`'s library.

Under GSPMD the product is partitioned like `cpu_int8.int8_dot`: rows of x_t and columns of g
keep their splits, and a contraction split alike on both is summed with one `psum` (the
data-parallel weight gradient: each device's rows, then the sum XLA would take anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax.core import cpu_int8
from bitnet_jax.core.cpu_int8 import WEIGHT_GRADIENT_DOT_TARGET
from bitnet_jax.core.cpu_int8_fused import one_batch_element_at_a_time


def available() -> bool:
    """Whether `weight_gradient_dot` runs here: our kernels built, and on AMX tiles now."""
    return cpu_int8.kernel_uses_amx()


def _local(x_t, g):
    out = jax.ShapeDtypeStruct((x_t.shape[0], g.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(WEIGHT_GRADIENT_DOT_TARGET, out)(x_t, g)


def _specs(mesh, arg_shapes):
    """Mesh axes of (x_t's rows, g's columns, the contraction), as `cpu_int8.dot_specs` splits
    a product of x (rows, k) and w (rows, k): g is w transposed."""
    g_spec = tuple(arg_shapes[1].sharding.spec) + (None,) * (2 - len(arg_shapes[1].sharding.spec))
    return cpu_int8.dot_specs(arg_shapes[0].sharding,
                              NamedSharding(mesh, P(g_spec[1], g_spec[0])))


def _partition(mesh, arg_shapes, result_shape):
    p, n, m = _specs(mesh, arg_shapes)

    def lower(x_t, g):
        out = _local(x_t, g)
        return jax.lax.psum(out, m) if m else out

    return (mesh, lower, NamedSharding(mesh, P(p, n)),
            (NamedSharding(mesh, P(p, m)), NamedSharding(mesh, P(m, n))))


def _infer(mesh, arg_shapes, result_shape):
    p, n, _ = _specs(mesh, arg_shapes)
    return NamedSharding(mesh, P(p, n))


_partitioned = custom_partitioning(_local)
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="p m, m n -> p n")


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
    if not available():
        why = cpu_int8.unavailable_reason() or f"no AMX tiles here, or {cpu_int8.AMX_ENV}=0"
        raise RuntimeError(f"weight_gradient_dot needs our kernels on AMX tiles: {why}")
    return one_batch_element_at_a_time(_partitioned, x_t, g2)
