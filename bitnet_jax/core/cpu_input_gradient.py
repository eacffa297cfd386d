"""The input gradient's bf16 product dx = g W_q^T on AMX tiles or AVX512-BF16 vectors
(`kernels/input_gradient.cc`).

    codes_input_gradient(g, codes, scale) -> bf16 (..., K)
        # g (..., N) bf16, codes (K, N) int8 (a linear's weight codes, stored (in, out)),
        # scale: one float32 per tensor or per output feature; w = bf16(codes * scale):
        # bf16(g @ w^T), each sum in float32 and rounded once

The exact quantized paths' backward takes dx = g W_q^T with W_q dequantized to bf16 and float32
accumulation (straight-through). XLA:CPU writes the dequantized weights, takes the product in
its bf16 library (YNNPACK) and leaves the float32 result for the next operation to round; at the
ladder presets' shapes on a 2-core Xeon with AMX it ran at 0.4-1.3 TFLOP/s (2026-12-05), and
the int8 input gradient's kernel, which quantizes g as well, in 0.4-0.7x its time. Here the
kernel packs the weights from their codes once per call, reads g's rows in place and rounds the
sums to bf16 as it stores them. The sums run in n's order, one float32 accumulator per output,
as XLA's own product runs them: bit for bit XLA's dot of g and the dequantized weights,
converted to bf16 (tested on the Xeon, on tiles, and on a 2-core AMD EPYC, on vectors, where
XLA's dot runs VDPBF16PS). Subnormal inputs count as zero, as in both instructions. Usable
where `cpu_int8.bf16_products` names a place: our kernels on AMX tiles, or a CPU with
AVX512-BF16 and no AMX.

Under GSPMD g's rows and the weights' rows (dx's columns) keep their splits; a split
contraction is gathered rather than summed, since each device's sums would be rounded to bf16
before the sum (a linear's out features are split only under tensor parallelism).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax.core import cpu_int8
from bitnet_jax.core.cpu_int8 import CODES_INPUT_GRADIENT_TARGET
from bitnet_jax.core.cpu_int8_fused import one_batch_element_at_a_time


def available() -> bool:
    """Whether this module's product runs here, with XLA's bits: `cpu_int8.bf16_products`."""
    return cpu_int8.bf16_products() is not None


def _local(g, codes, scale):
    out = jax.ShapeDtypeStruct((g.shape[0], codes.shape[0]), jnp.bfloat16)
    return jax.ffi.ffi_call(CODES_INPUT_GRADIENT_TARGET, out)(g, codes, scale)


def _specs(arg_shapes):
    """Mesh axes of (g's rows, the weights' rows): `cpu_int8.dot_axes`' split of a product of
    g (rows, n) and codes (rows, n), less the contraction's."""
    m, k, _ = cpu_int8.dot_axes(cpu_int8.matrix_spec(arg_shapes[0].sharding),
                                cpu_int8.matrix_spec(arg_shapes[1].sharding))
    return m, k


def _partition(mesh, arg_shapes, result_shape):
    m, k = _specs(arg_shapes)
    return (mesh, _local, NamedSharding(mesh, P(m, k)),
            (NamedSharding(mesh, P(m, None)), NamedSharding(mesh, P(k, None)),
             NamedSharding(mesh, P(None))))


def _infer(mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, P(*_specs(arg_shapes)))


_partitioned = custom_partitioning(_local)
_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="m n, k n, n -> m k",
                           need_replication_factors=("n",))


def codes_input_gradient(g: jax.Array, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """bf16(g @ w^T) for bf16 g (..., N) and a linear's int8 codes (K, N) with `scale` (one
    float32 per tensor, or per output feature: shape (), (1,) or (N,)), w = bf16(codes * scale):
    the bits of XLA's float32 dot of g and w rounded to bf16. Needs `available()`."""
    if g.dtype != jnp.bfloat16 or codes.dtype != jnp.int8:
        raise TypeError(f"codes_input_gradient wants bf16 g and int8 codes, got {g.dtype} and "
                        f"{codes.dtype}")
    n = g.shape[-1]
    if codes.ndim != 2 or codes.shape[1] != n or scale.size not in (1, n):
        raise ValueError(f"codes_input_gradient: g {g.shape}, codes {codes.shape}, scale "
                         f"{scale.shape} (want g (..., N), codes (K, N), scale of 1 or N)")
    if not available():
        raise RuntimeError("the input gradient's kernel needs our kernels on AMX tiles or "
                           f"AVX512-BF16 vectors: {cpu_int8.bf16_products_missing()}")
    rows = math.prod(g.shape[:-1])
    scale = jnp.broadcast_to(jnp.reshape(scale, (-1,)).astype(jnp.float32), (n,))
    dx = one_batch_element_at_a_time(_partitioned, g.reshape(rows, n), codes, scale)
    return dx.reshape(*g.shape[:-1], codes.shape[0])
