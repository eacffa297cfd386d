"""Exact int8 x int8 -> int32 matmul on x86 CPUs with AVX512-VNNI (and AMX), as an XLA FFI
custom call, and the dequantize-and-transpose that the integer path's weight gradient needs.

XLA:CPU lowers an int8 `dot_general` with int32 accumulation to a kernel that is slower than
its bf16 dot.  `kernels/int8_matmul.cc` is a small VNNI (`vpdpbusd`) kernel; this module
compiles it with g++ on first use (`ffi_library.KernelLibrary`: cached under
``~/.cache/bitnet_jax/``, keyed by a hash of the source, the compiler and its flags), registers
it with XLA and exposes::

    available() -> bool
    int8_dot(x, w) -> int32      # x (..., K) int8, w (N, K) int8 ("out x in"), -> (..., N)
    dequantize_transpose(codes, scale) -> bf16   # (K, rows): X_q^T for the weight gradient

`int8_dot` is bit-identical to
``lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=int32)``.
Use it only when `available()` is True (CPU backend, AVX512-VNNI CPU, g++ present, build
succeeded); otherwise fall back to `lax.dot_general` -- `int8_dot_or_xla` does this for you.

Set ``BITNET_JAX_CPU_INT8=0`` to disable the kernel; ``BITNET_JAX_CACHE_DIR`` moves the cache.
On CPUs with AMX-INT8 the kernel's products of many rows run on AMX tiles
(`kernel_uses_amx`; ``BITNET_JAX_CPU_AMX=0`` keeps AVX-512 VNNI); there XLA's own int8 dot is
still the faster of the two for `int8_dot`'s int32 output from a few dozen rows on
(`xla_int8_is_faster`), while the products with a bf16 output (`cpu_int8_fused`) are ours.

Under GSPMD the product is partitioned (`jax.experimental.custom_partitioning`): each device
runs the kernel on its shards -- rows of `x` as `x` is split, rows of `w` (output features) as
`w` is split, and a contraction split alike on both operands summed with one `psum` -- so a
tensor-parallel weight is never gathered.  (A bare FFI call is opaque to GSPMD, which would
gather both operands and run the whole product on every device.)
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning

from bitnet_jax.core.ffi_library import KernelLibrary, cpu_flags

_log = logging.getLogger(__name__)

TARGET_NAME = "bitnet_int8_dot"
DEQUANTIZE_TRANSPOSE_TARGET = "bitnet_dequantize_transpose"
# The fused entry points of the same source, wrapped by `cpu_int8_fused`, the weight and input
# gradients on AMX tiles (`cpu_weight_gradient`, `cpu_input_gradient`), the weights' ternary
# quantization (`cpu_ternary`) and rows' k-th largest values (`cpu_order_statistics`): registered
# here so that one build, one load and one registration serve all six modules.
ABSMAX_QUANT_DOT_TARGET = "bitnet_absmax_quant_dot"
SCALED_QUANT_DOT_TARGET = "bitnet_scaled_quant_dot"
QUANTIZE_TRANSPOSE_TARGET = "bitnet_quantize_transpose"
ABSMAX_QUANTIZE_TARGET = "bitnet_absmax_quantize"
INT8_SCALED_DOT_TARGET = "bitnet_int8_scaled_dot"
WEIGHT_GRADIENT_DOT_TARGET = "bitnet_weight_gradient_dot"  # `cpu_weight_gradient`'s
QUANTIZED_WEIGHT_GRADIENT_TARGET = "bitnet_quantized_weight_gradient"
CODES_INPUT_GRADIENT_TARGET = "bitnet_codes_input_gradient"  # `cpu_input_gradient`'s
TERNARY_ABSMEAN_TARGET = "bitnet_ternary_absmean"  # `cpu_ternary`'s
KTH_LARGEST_16_TARGET = "bitnet_kth_largest_u16"  # `cpu_order_statistics`'
KTH_LARGEST_32_TARGET = "bitnet_kth_largest_u32"
_KERNELS = Path(__file__).with_name("kernels")
_ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
_LIBRARY = KernelLibrary(
    "int8_matmul",
    sources=(_KERNELS / "int8_matmul.cc", _KERNELS / "ternary_absmean.cc",
             _KERNELS / "kth_largest.cc", _KERNELS / "weight_gradient.cc",
             _KERNELS / "input_gradient.cc"),
    headers=(_KERNELS / "ffi_parallel.h", _KERNELS / "amx_tiles.h", _KERNELS / "kernel_util.h"),
    cxx_flags=("-O3", "-std=c++17", "-shared", "-fPIC", "-w") + _ISA_FLAGS,
    required_cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
    symbols={TARGET_NAME: "BitnetInt8Dot",
             DEQUANTIZE_TRANSPOSE_TARGET: "BitnetDequantizeTranspose",
             ABSMAX_QUANT_DOT_TARGET: "BitnetAbsmaxQuantDot",
             SCALED_QUANT_DOT_TARGET: "BitnetScaledQuantDot",
             QUANTIZE_TRANSPOSE_TARGET: "BitnetQuantizeTranspose",
             ABSMAX_QUANTIZE_TARGET: "BitnetAbsmaxQuantize",
             INT8_SCALED_DOT_TARGET: "BitnetInt8ScaledDot",
             WEIGHT_GRADIENT_DOT_TARGET: "BitnetWeightGradientDot",
             QUANTIZED_WEIGHT_GRADIENT_TARGET: "BitnetQuantizedWeightGradient",
             CODES_INPUT_GRADIENT_TARGET: "BitnetCodesInputGradient",
             TERNARY_ABSMEAN_TARGET: "BitnetTernaryAbsmean",
             KTH_LARGEST_16_TARGET: "BitnetKthLargest16",
             KTH_LARGEST_32_TARGET: "BitnetKthLargest32"},
    logger=_log,
    failure_message="bitnet_jax.core.cpu_int8: VNNI kernel unavailable, using XLA's int8 dot")


def available() -> bool:
    """Whether `int8_dot` can be used here (builds and registers the kernel on first call)."""
    return _LIBRARY.available()


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _LIBRARY.unavailable_reason()


def _ffi_dot_local(x2, w):
    m, n = x2.shape[0], w.shape[0]
    return jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((m, n), jnp.int32))(x2, w)


def mesh_axes(entry) -> tuple:
    """The mesh axes of one entry of a PartitionSpec, as a tuple (none for None)."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def matrix_spec(sharding) -> tuple:
    """A 2-D operand's PartitionSpec entries (rows, columns), None where it is not split."""
    spec = tuple(sharding.spec)
    return spec + (None,) * (2 - len(spec))


def dot_specs(x_sharding, w_sharding):
    """Mesh axes of (rows of x, rows of w, contraction) for the local products of x (rows, k)
    and w (rows, k): `dot_axes` of their specs."""
    return dot_axes(matrix_spec(x_sharding), matrix_spec(w_sharding))


def dot_axes(x_spec, w_spec):
    """Mesh axes of (rows of x, rows of w, contraction) from the (rows, k) spec entries of x
    and w.

    Rows keep their operands' splits; an axis on both would need the same device to hold
    different row blocks of each, so w's rows give way (w is gathered along it). The
    contraction stays split only when x and w split it the same way (then psum), else it is
    gathered. (`cpu_int8_fused` splits the rows of its fused products the same way,
    `cpu_weight_gradient` its products' rows and columns.)"""
    m, n = mesh_axes(x_spec[0]), mesh_axes(w_spec[0])
    k = mesh_axes(x_spec[1]) if x_spec[1] == w_spec[1] else ()
    if set(n) & set(m):
        n = ()
    if set(k) & (set(m) | set(n)):
        k = ()
    spec = lambda axes: axes if len(axes) > 1 else (axes[0] if axes else None)  # noqa: E731
    return spec(m), spec(n), spec(k)


def _partition(mesh, arg_shapes, result_shape):
    from jax.sharding import NamedSharding, PartitionSpec as P

    m, n, k = dot_specs(arg_shapes[0].sharding, arg_shapes[1].sharding)

    def lower(x2, w):
        out = _ffi_dot_local(x2, w)
        return jax.lax.psum(out, k) if k else out  # int32 sums wrap exactly as one dot does

    return (mesh, lower, NamedSharding(mesh, P(m, n)),
            (NamedSharding(mesh, P(m, k)), NamedSharding(mesh, P(n, k))))


def _infer_result_sharding(mesh, arg_shapes, result_shape):
    from jax.sharding import NamedSharding, PartitionSpec as P

    m, n, _ = dot_specs(arg_shapes[0].sharding, arg_shapes[1].sharding)
    return NamedSharding(mesh, P(m, n))


_partitioned_dot = custom_partitioning(_ffi_dot_local)
_partitioned_dot.def_partition(partition=_partition,
                               infer_sharding_from_operands=_infer_result_sharding,
                               sharding_rule="m k, n k -> m n")


@jax.custom_batching.custom_vmap
def _ffi_dot_2d(x2, w):
    return _partitioned_dot(x2, w)


@_ffi_dot_2d.def_vmap
def _ffi_dot_2d_vmap(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if not w_batched:  # shared weights: fold the batch into the rows
        if not x_batched:
            return _ffi_dot_2d(x, w), False
        b, m, k = x.shape
        return _ffi_dot_2d(x.reshape(b * m, k), w).reshape(b, m, w.shape[0]), True
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    out = jax.lax.dot_general(x, w, (((2,), (2,)), ((0,), (0,))),
                              preferred_element_type=jnp.int32)
    return out, True


def int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) int8 @ w (N, K).T int8 -> (..., N) int32, exact.  Needs `available()`."""
    if x.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"int8_dot wants int8 operands, got {x.dtype} and {w.dtype}")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"int8_dot: x {x.shape} and w {w.shape} (want x (..., K), w (N, K))")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: {unavailable_reason()}")
    lead = x.shape[:-1]
    out = _ffi_dot_2d(x.reshape(-1, x.shape[-1]), w)
    return out.reshape(*lead, w.shape[0])


def _xla_int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)


# XLA:CPU runs int8 products on AMX tiles where the CPU has them (Intel Sapphire Rapids and
# later); our kernel uses AVX-512 VNNI alone. On a 2-core Xeon with AMX-INT8 (2026-12-04, jitted,
# median of 30, K x N = 512 x 1376 and 2560 x 6912) the two tie at 16 rows, XLA's dot is 1.1-2.5x
# faster from 64 rows, and the kernel 3.7x faster at 2 rows (decoding).
XLA_INT8_MIN_ROWS_WITH_AMX = 32
# "0": no AMX tiles, in our kernels (`kernels/int8_matmul.cc` reads the same name) or through
# XLA's int8 dot
AMX_ENV = "BITNET_JAX_CPU_AMX"


@functools.cache
def _has_amx_int8() -> bool:
    """AMX-INT8 on this CPU, and not switched off (BITNET_JAX_CPU_AMX=0)."""
    return os.environ.get(AMX_ENV, "1") != "0" and "amx_int8" in cpu_flags()


def kernel_uses_amx() -> bool:
    """Whether our kernels' products run on AMX tiles in this process now: the CPU has
    AMX-INT8, BITNET_JAX_CPU_AMX is not "0" (the kernel reads it at every call), and Linux
    granted the process the tiles' state (the kernel asks once, `arch_prctl`). There
    `cpu_int8_fused.int8_scaled_dot` takes 0.35-0.65x the time of XLA's int8 dot and its
    dequantizing pass at the ladder presets' shapes, so `matmul` routes both paths' int8
    products through it."""
    return available() and bool(_LIBRARY.c_function("BitnetAmxTiles")())


def int8_beats_bf16(rows: int) -> bool:
    """Whether an int8 product of `rows` rows (ours, or XLA's where `xla_int8_is_faster`) beats
    XLA's bf16 dot on this CPU: on AMX tiles (ours or XLA's), and on CPUs without AMX, where
    XLA's bf16 dot runs AVX-512 (VDPBF16PS: half the multiply-adds of our kernel's VNNI
    instruction; our int8 product took 0.48-0.54x XLA's bf16 product's time at the ladder
    presets' shapes on a 2-core AMD EPYC, README, Benchmarks). Not on AMX CPUs with our tiles
    off (BITNET_JAX_CPU_AMX=0): XLA's bf16 dot still takes the tiles there."""
    return (kernel_uses_amx() or xla_int8_is_faster(rows)
            or (available() and "amx_bf16" not in cpu_flags()))


def bf16_products() -> Optional[str]:
    """Where the backward's bf16 kernels (`cpu_input_gradient`, `cpu_weight_gradient`) run in
    this process, each in the order XLA's own bf16 dot sums on this CPU (so that they give its
    bits): "tiles" where our kernels run on AMX tiles (`kernel_uses_amx`), "vectors" on CPUs with
    AVX512-BF16 and no AMX (AMD Zen 4; XLA's dot runs VDPBF16PS there), else None (XLA's dot:
    AMX CPUs with BITNET_JAX_CPU_AMX=0, whose XLA still takes the tiles, and CPUs without
    bf16 instructions)."""
    if kernel_uses_amx():
        return "tiles"
    flags = cpu_flags()
    if available() and "avx512_bf16" in flags and "amx_bf16" not in flags:
        return "vectors"
    return None


def bf16_products_take(rows: int) -> bool:
    """Whether the backward's bf16 kernels give XLA's bits for a product with `rows` rows of
    output here: everywhere on tiles; on vectors from 2 rows (XLA's product of one row is a
    matrix-vector product that sums in an order of its own; `kernels/kernel_util.h`)."""
    where = bf16_products()
    return where == "tiles" or (where == "vectors" and rows >= 2)


def bf16_products_missing() -> str:
    """Why `bf16_products` is None ("" where it is not)."""
    if bf16_products() is not None:
        return ""
    return unavailable_reason() or (f"no AMX tiles for our kernels here ({AMX_ENV}=0, or none), "
                                    "and no AVX512-BF16 on a CPU without AMX")


def xla_int8_is_faster(rows: int) -> bool:
    """Whether XLA's own int8 dot beats `int8_dot` (int32 out) for a product of `rows` rows on
    this CPU. (The fused products of `cpu_int8_fused`, bf16 out, beat XLA's dot and its passes
    on AMX too: `kernel_uses_amx`.)"""
    return rows >= XLA_INT8_MIN_ROWS_WITH_AMX and _has_amx_int8()


def int8_dot_or_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """`int8_dot` when available and faster (`xla_int8_is_faster`), else the same product
    through `lax.dot_general`.

    `platform_dependent`, so that a CPU host compiling for a TPU or GPU (`bitnet sweep plan
    --compile`) lowers XLA's dot there instead of a custom call that only the CPU has.
    """
    if available() and not xla_int8_is_faster(math.prod(x.shape[:-1])):
        return jax.lax.platform_dependent(x, w, cpu=int8_dot, default=_xla_int8_dot)
    return _xla_int8_dot(x, w)


def _dequantize_transpose_xla(codes2, scale1):
    return (codes2.astype(jnp.float32) * scale1[:, None]).astype(jnp.bfloat16).T


@jax.custom_batching.custom_vmap
def _ffi_dequantize_transpose(codes2, scale1):
    m, k = codes2.shape
    return jax.ffi.ffi_call(DEQUANTIZE_TRANSPOSE_TARGET,
                            jax.ShapeDtypeStruct((k, m), jnp.bfloat16))(codes2, scale1)


@_ffi_dequantize_transpose.def_vmap
def _ffi_dequantize_transpose_vmap(axis_size, in_batched, codes, scale):
    codes_batched, scale_batched = in_batched
    if not codes_batched:
        codes = jnp.broadcast_to(codes, (axis_size, *codes.shape))
    if not scale_batched:
        scale = jnp.broadcast_to(scale, (axis_size, *scale.shape))
    return jax.vmap(_dequantize_transpose_xla)(codes, scale), True


def _rows_and_scales(codes: jax.Array, scale: jax.Array):
    lead = codes.shape[:-1]
    if scale.shape not in (lead, (*lead, 1)):
        raise ValueError(f"dequantize_transpose: codes {codes.shape} want one scale per row, "
                         f"shape {lead} or {(*lead, 1)}; got {scale.shape}")
    rows = math.prod(lead)
    return codes.reshape(rows, codes.shape[-1]), scale.reshape(rows)


def dequantize_transpose(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Per-row dequantization, transposed: codes (..., K) int8 and one float32 scale per row
    (shape (...) or (..., 1)) -> bfloat16 (K, rows), rows = prod(...).

    Bit-identical to ``(codes.astype(f32) * scale).astype(bf16).reshape(-1, K).T``: the
    operand the weight gradient X^T G wants. Needs `available()`.
    """
    if codes.dtype != jnp.int8 or scale.dtype != jnp.float32:
        raise TypeError(f"dequantize_transpose wants int8 codes and float32 scales, got "
                        f"{codes.dtype} and {scale.dtype}")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: {unavailable_reason()}")
    return _ffi_dequantize_transpose(*_rows_and_scales(codes, scale))

