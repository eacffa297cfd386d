"""Activation quantization fused into the int8 product, and its backward, on x86 CPUs.

The entry points live in `cpu_int8`'s library (`kernels/int8_matmul.cc`): its `KernelLibrary`
builds, loads and registers them along with `int8_dot`'s, and this module wraps them::

    available() -> bool
    absmax_quant_dot(x, w_codes, w_scale, bits, floor) -> (y, mult, scale)
    scaled_quant_dot(x, w_codes, w_scale, mult, scale, lo, hi) -> y
    quantize_transpose(x, mult, scale, lo, hi) -> X_q^T
    absmax_quantize(x, bits, floor) -> (codes, mult, scale)
    int8_scaled_dot(codes, row_scale, w_codes, w_scale) -> y

x is bfloat16 (..., K), w_codes int8 (N, K) ("out x in"), w_scale float32 (N,). Each row of x is
quantized while the kernel takes it (codes = clip(round_half_even(x * mult), lo, hi)), so no int8
copy of the activations is written; y = bf16((codes @ w_codes.T) * scale * w_scale) is
bit-identical to `matmul.quantized_dot`'s integer path. `absmax_quant_dot` computes the absmax
row parameters itself (mult = (1 / max(max|x|, 1e-5)) * q, scale = max(max|x|, 1e-5) * (1 / q)
with q = 2^(bits-1) - 1, as XLA computes `quant.absmax_per_token`) and returns them for the
backward; `floor=0` (gradients, whose small rows a 1e-5 floor would flush) leaves max|x| as
it is, except that an all-zero row takes 1; `scaled_quant_dot` takes them (absmean: a mean's
rounding depends on the reduction order, so XLA computes it as the unfused path does).
`quantize_transpose` re-derives the codes from x and writes bf16(codes * scale) transposed, the
operand of the weight gradient. `absmax_quantize` is the absmax quantization alone (int8 codes
and the row parameters, one pass), for products XLA takes itself, where XLA's row maximum and
codes fusion would be two operations of the step. `int8_scaled_dot` multiplies codes quantized
beforehand (one scale per row) and writes y as the fused products do, so that an input several
linears share is quantized once. The products run on AMX tiles where the CPU has them
(`cpu_int8.kernel_uses_amx`), else on AVX-512 VNNI, with the same results.
Activations must be finite. Under `vmap` the calls run one batch element at a time.

Under GSPMD the calls are partitioned as `cpu_int8.int8_dot` is (`custom_partitioning`): each
device quantizes and multiplies its own rows of x by its own rows (output features) of w; the
contraction is gathered, since a row's quantization needs all of it, and `quantize_transpose`
keeps both of x's splits. (A bare FFI call would gather both operands onto every device.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from bitnet_jax.core import cpu_int8
from bitnet_jax.core.cpu_int8 import (ABSMAX_QUANT_DOT_TARGET, ABSMAX_QUANTIZE_TARGET,
                                     INT8_SCALED_DOT_TARGET, QUANTIZE_TRANSPOSE_TARGET,
                                     SCALED_QUANT_DOT_TARGET)


def available() -> bool:
    """Whether the fused entry points can be used: they are registered with `cpu_int8`'s."""
    return cpu_int8.available()


def _require(x, w_codes=None, w_scale=None):
    if x.dtype != jnp.bfloat16:
        raise TypeError(f"fused int8 kernels want bfloat16 activations, got {x.dtype}")
    if w_codes is not None:
        if w_codes.dtype != jnp.int8 or w_codes.ndim != 2 or w_codes.shape[1] != x.shape[-1]:
            raise ValueError(f"w_codes must be int8 (N, K={x.shape[-1]}), got "
                             f"{w_codes.dtype} {w_codes.shape}")
        if w_scale.dtype != jnp.float32 or w_scale.shape != (w_codes.shape[0],):
            raise ValueError(f"w_scale must be float32 ({w_codes.shape[0]},), got "
                             f"{w_scale.dtype} {w_scale.shape}")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: "
                           f"{cpu_int8.unavailable_reason()}")


# ---------------------------------------------------------------------------------------------
# The FFI calls on one device's rows (2-D x), partitioned under GSPMD.

_BF16, _F32 = jnp.bfloat16, jnp.float32


def _absmax_local(x2, w, w_scale, q_max, floor):
    m, n = x2.shape[0], w.shape[0]
    out = (jax.ShapeDtypeStruct((m, n), _BF16), jax.ShapeDtypeStruct((m,), _F32),
           jax.ShapeDtypeStruct((m,), _F32))
    return jax.ffi.ffi_call(ABSMAX_QUANT_DOT_TARGET, out)(x2, w, w_scale, q_max=np.int32(q_max),
                                                         floor=np.float32(floor))


def _scaled_local(x2, w, w_scale, mult, scale, lo, hi):
    out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), _BF16)
    return jax.ffi.ffi_call(SCALED_QUANT_DOT_TARGET, out)(x2, w, w_scale, mult, scale,
                                                          lo=np.int32(lo), hi=np.int32(hi))


def _quantize_local(x2, q_max, floor):
    m = x2.shape[0]
    out = (jax.ShapeDtypeStruct(x2.shape, jnp.int8), jax.ShapeDtypeStruct((m,), _F32),
           jax.ShapeDtypeStruct((m,), _F32))
    return jax.ffi.ffi_call(ABSMAX_QUANTIZE_TARGET, out)(x2, q_max=np.int32(q_max),
                                                        floor=np.float32(floor))


def _int8_scaled_local(codes2, row_scale, w, w_scale):
    out = jax.ShapeDtypeStruct((codes2.shape[0], w.shape[0]), _BF16)
    return jax.ffi.ffi_call(INT8_SCALED_DOT_TARGET, out)(codes2, row_scale, w, w_scale)


def _transpose_local(x2, mult, scale, lo, hi):
    out = jax.ShapeDtypeStruct(x2.shape[::-1], _BF16)
    return jax.ffi.ffi_call(QUANTIZE_TRANSPOSE_TARGET, out)(x2, mult, scale, lo=np.int32(lo),
                                                            hi=np.int32(hi))


def _dot_shardings(mesh, arg_shapes):
    """(x, w, x's rows, w's rows, y) shardings: rows split as `cpu_int8` splits its product's,
    the contraction whole."""
    m, n, _ = cpu_int8.dot_specs(arg_shapes[0].sharding, arg_shapes[1].sharding)
    return (NamedSharding(mesh, P(m, None)), NamedSharding(mesh, P(n, None)),
            NamedSharding(mesh, P(m)), NamedSharding(mesh, P(n)), NamedSharding(mesh, P(m, n)))


def _absmax_partition(q_max, floor, mesh, arg_shapes, result_shape):
    x, w, rows, cols, y = _dot_shardings(mesh, arg_shapes)
    return (mesh, lambda *a: _absmax_local(*a, q_max, floor), (y, rows, rows), (x, w, cols))


def _absmax_infer(q_max, floor, mesh, arg_shapes, result_shape):
    _, _, rows, _, y = _dot_shardings(mesh, arg_shapes)
    return y, rows, rows


def _scaled_partition(lo, hi, mesh, arg_shapes, result_shape):
    x, w, rows, cols, y = _dot_shardings(mesh, arg_shapes)
    return mesh, lambda *a: _scaled_local(*a, lo, hi), y, (x, w, cols, rows, rows)


def _scaled_infer(lo, hi, mesh, arg_shapes, result_shape):
    return _dot_shardings(mesh, arg_shapes)[-1]


def scaled_dot_partitioned(local):
    """`local(codes (m, k), row_scale (m,), w_codes (n, k), w_scale (n,)) -> y (m, n)` under
    GSPMD as `int8_scaled_dot` is: each device multiplies its own rows of the codes by its own
    rows (output features) of w, the contraction gathered. Shared with the GPU kernel of the
    same product (`gpu_int8`)."""
    def partition(mesh, arg_shapes, result_shape):
        x, w, rows, cols, y = _dot_shardings(mesh, (arg_shapes[0], arg_shapes[2]))
        return mesh, local, y, (x, rows, w, cols)

    def infer(mesh, arg_shapes, result_shape):
        return _dot_shardings(mesh, (arg_shapes[0], arg_shapes[2]))[-1]

    call = custom_partitioning(local)
    call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                       sharding_rule="m k, m, n k, n -> m n", need_replication_factors=("k",))
    return call


def row_shardings(mesh, arg_shapes):
    """(x and what is shaped like it, x's rows): rows split as x's, each row whole (a row's
    maximum or order statistic needs all of it)."""
    m = tuple(arg_shapes[0].sharding.spec)[:1] or (None,)
    return NamedSharding(mesh, P(m[0], None)), NamedSharding(mesh, P(m[0]))


def _quantize_partition(q_max, floor, mesh, arg_shapes, result_shape):
    x, rows = row_shardings(mesh, arg_shapes)
    return mesh, lambda x2: _quantize_local(x2, q_max, floor), (x, rows, rows), (x,)


def _quantize_infer(q_max, floor, mesh, arg_shapes, result_shape):
    x, rows = row_shardings(mesh, arg_shapes)
    return x, rows, rows


def _transpose_shardings(mesh, arg_shapes):
    """(x, x's rows, X^T): both of x's splits kept, the rows' parameters split with its rows."""
    m, k = cpu_int8.matrix_spec(arg_shapes[0].sharding)
    return NamedSharding(mesh, P(m, k)), NamedSharding(mesh, P(m)), NamedSharding(mesh, P(k, m))


def _transpose_partition(lo, hi, mesh, arg_shapes, result_shape):
    x, rows, out = _transpose_shardings(mesh, arg_shapes)
    return mesh, lambda *a: _transpose_local(*a, lo, hi), out, (x, rows, rows)


def _transpose_infer(lo, hi, mesh, arg_shapes, result_shape):
    return _transpose_shardings(mesh, arg_shapes)[-1]


_absmax_partitioned = custom_partitioning(_absmax_local, static_argnums=(3, 4))
_absmax_partitioned.def_partition(partition=_absmax_partition,
                                  infer_sharding_from_operands=_absmax_infer,
                                  sharding_rule="m k, n k, n -> m n, m, m",
                                  need_replication_factors=("k",))
_scaled_partitioned = custom_partitioning(_scaled_local, static_argnums=(5, 6))
_scaled_partitioned.def_partition(partition=_scaled_partition,
                                  infer_sharding_from_operands=_scaled_infer,
                                  sharding_rule="m k, n k, n, m, m -> m n",
                                  need_replication_factors=("k",))
_int8_scaled_partitioned = scaled_dot_partitioned(_int8_scaled_local)
_quantize_partitioned = custom_partitioning(_quantize_local, static_argnums=(1, 2))
_quantize_partitioned.def_partition(partition=_quantize_partition,
                                    infer_sharding_from_operands=_quantize_infer,
                                    sharding_rule="m k -> m k, m, m",
                                    need_replication_factors=("k",))
_transpose_partitioned = custom_partitioning(_transpose_local, static_argnums=(3, 4))
_transpose_partitioned.def_partition(partition=_transpose_partition,
                                     infer_sharding_from_operands=_transpose_infer,
                                     sharding_rule="m k, m, m -> k m")


def one_batch_element_at_a_time(fn, *args):
    """fn(*args) with a vmap rule that maps it over the batch (`custom_partitioning` has no
    batching rule; unbatched operands are closed over, not copied per element)."""
    call = jax.custom_batching.custom_vmap(fn)

    @call.def_vmap
    def _rule(axis_size, in_batched, *operands):
        def one(batched_slices):
            it = iter(batched_slices)
            return call(*(next(it) if b else a for a, b in zip(operands, in_batched)))

        out = jax.lax.map(one, [a for a, b in zip(operands, in_batched) if b])
        return out, jax.tree.map(lambda _: True, out)

    return call(*args)


# ---------------------------------------------------------------------------------------------
# The calls on x of any rank (its leading dimensions are rows).


def _rows(x):
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def absmax_quant_dot(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, bits: int = 8,
                     floor: float = 1e-5):
    """Per-token absmax quantization of x fused into x_q @ w.T: (y bf16 (..., N), mult, scale),
    mult and scale float32 of shape x.shape[:-1]. Each row's max|x| is raised to `floor`; with
    `floor=0` an all-zero row takes 1."""
    _require(x, w_codes, w_scale)
    if not 2 <= bits <= 8:
        raise ValueError(f"absmax_quant_dot: bits must be 2..8, got {bits}")
    if not floor >= 0:
        raise ValueError(f"absmax_quant_dot: floor must be >= 0, got {floor}")
    lead, n, q_max = x.shape[:-1], w_codes.shape[0], 2 ** (bits - 1) - 1
    y, mult, scale = one_batch_element_at_a_time(
        lambda *a: _absmax_partitioned(*a, q_max, float(floor)), _rows(x), w_codes, w_scale)
    return y.reshape(*lead, n), mult.reshape(lead), scale.reshape(lead)


def scaled_quant_dot(x, w_codes, w_scale, mult, scale, lo: int, hi: int) -> jax.Array:
    """x quantized per row with the given `mult` and `scale` (shape x.shape[:-1]) fused into
    x_q @ w.T -> bf16 (..., N)."""
    _require(x, w_codes, w_scale)
    lead, rows, n = x.shape[:-1], math.prod(x.shape[:-1]), w_codes.shape[0]
    y = one_batch_element_at_a_time(
        lambda *a: _scaled_partitioned(*a, lo, hi), _rows(x), w_codes, w_scale,
        mult.reshape(rows).astype(_F32), scale.reshape(rows).astype(_F32))
    return y.reshape(*lead, n)


def quantize_transpose(x, mult, scale, lo: int, hi: int) -> jax.Array:
    """bf16(clip(round(x * mult), lo, hi) * scale) as (K, rows): X_q^T for the weight gradient."""
    _require(x)
    rows = math.prod(x.shape[:-1])
    return one_batch_element_at_a_time(
        lambda *a: _transpose_partitioned(*a, lo, hi), _rows(x),
        mult.reshape(rows).astype(_F32), scale.reshape(rows).astype(_F32))


def absmax_quantize(x: jax.Array, bits: int = 8, floor: float = 1e-5):
    """Per-token absmax quantization of bf16 x (..., K) in one pass: (int8 codes (..., K), mult,
    scale), mult and scale float32 of shape x.shape[:-1]; the numbers of `absmax_quant_dot` (and
    of `quant.absmax_per_token` for `floor` 1e-5), without the product."""
    _require(x)
    if not 2 <= bits <= 8:
        raise ValueError(f"absmax_quantize: bits must be 2..8, got {bits}")
    if not floor >= 0:
        raise ValueError(f"absmax_quantize: floor must be >= 0, got {floor}")
    lead, q_max = x.shape[:-1], 2 ** (bits - 1) - 1
    codes, mult, scale = one_batch_element_at_a_time(
        lambda x2: _quantize_partitioned(x2, q_max, float(floor)), _rows(x))
    return codes.reshape(x.shape), mult.reshape(lead), scale.reshape(lead)


def int8_scaled_dot(codes: jax.Array, row_scale: jax.Array, w_codes: jax.Array,
                    w_scale: jax.Array) -> jax.Array:
    """bf16((codes @ w_codes.T) * row_scale * w_scale) for int8 codes (..., K) quantized
    beforehand with one float32 scale per row (shape codes.shape[:-1]): the integer path's y,
    bit for bit, in one call instead of an int8 dot and a dequantizing pass."""
    if codes.dtype != jnp.int8:
        raise TypeError(f"int8_scaled_dot wants int8 codes, got {codes.dtype}")
    _require(jnp.zeros((0, codes.shape[-1]), jnp.bfloat16), w_codes, w_scale)
    lead, rows, n = codes.shape[:-1], math.prod(codes.shape[:-1]), w_codes.shape[0]
    y = one_batch_element_at_a_time(
        _int8_scaled_partitioned, _rows(codes), row_scale.reshape(rows).astype(_F32), w_codes,
        w_scale)
    return y.reshape(*lead, n)
