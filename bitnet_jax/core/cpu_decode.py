"""Decode-time CPU kernels: products that read the weights once, in their stored form.

* `ternary_dot`: exact int8 activations x 2-bit packed ternary weights -> int32 (AVX512-VNNI).
  `kernels/ternary_matmul.cc` reads our 2-bit layout (`packing.pack_2bit`, transformers' own)
directly and unpacks it in registers, as bitnet.cpp's I2_S kernels do, so decoding streams 2
bits per weight from memory instead of unpacking to int8 first (XLA materialises the unpacked
codes before every product). Built with g++ on first use and registered as an XLA FFI target
by `ffi_library.KernelLibrary`, as `cpu_int8`'s kernel is::

    available() -> bool
    ternary_dot(x, packed, n_out) -> int32   # x (..., K) int8, packed (ceil(n_out/4), K) uint8
    ternary_dot_or_xla(x, packed, n_out)     # the kernel, or unpack + `cpu_int8.int8_dot_or_xla`

Bit-identical to the int8 product of the unpacked codes. Made for decoding (a few rows of x):
with more than `MAX_ROWS` rows `ternary_dot_or_xla` unpacks once and takes the int8 path
(it re-reads the weights per 4 rows, which stops paying off for long prefills).
``BITNET_JAX_CPU_INT8=0`` disables this kernel too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from bitnet_jax.core import cpu_int8, packing
from bitnet_jax.core.ffi_library import KernelLibrary

_log = logging.getLogger(__name__)

TARGET_NAME = "bitnet_ternary_dot"
BF16_TARGET_NAME = "bitnet_bf16_dot"
_KERNELS = Path(__file__).with_name("kernels")
_LIBRARY = KernelLibrary(
    "decode_kernels",
    sources=(_KERNELS / "ternary_matmul.cc", _KERNELS / "bf16_matvec.cc"),
    headers=(_KERNELS / "ffi_parallel.h",),
    cxx_flags=("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512vnni"),
    required_cpu_flags=("avx512f", "avx512bw", "avx512_vnni"),
    symbols={TARGET_NAME: "BitnetTernaryDot", BF16_TARGET_NAME: "BitnetBf16Dot"},
    logger=_log,
    failure_message="bitnet_jax.core.cpu_decode: kernel unavailable")
MAX_ROWS = 16  # rows of x (tokens x batch) up to which the packed kernel is used


def available() -> bool:
    """Whether `ternary_dot` can run here (builds and registers the kernel on first call)."""
    return _LIBRARY.available()


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _LIBRARY.unavailable_reason()


def ternary_dot(x: jax.Array, packed: jax.Array, n_out: int) -> jax.Array:
    """x (..., K) int8 times the ternary (n_out, K) codes packed as `packing.pack_2bit` ->
    (..., n_out) int32, exact. Needs `available()`; any number of rows (see MAX_ROWS)."""
    if x.dtype != jnp.int8 or packed.dtype != jnp.uint8:
        raise TypeError(f"ternary_dot wants int8 x and uint8 packed, got {x.dtype}, {packed.dtype}")
    if packed.ndim != 2 or x.shape[-1] != packed.shape[1] or packed.shape[0] != -(-n_out // 4):
        raise ValueError(f"ternary_dot: x {x.shape}, packed {packed.shape}, n_out={n_out} (want "
                         f"x (..., K), packed (ceil(n_out/4), K))")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_decode kernel unavailable: {unavailable_reason()}")
    lead = x.shape[:-1]
    rows = math.prod(lead)
    out = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((rows, n_out), jnp.int32))(
        x.reshape(rows, x.shape[-1]), packed)
    return out.reshape(*lead, n_out)


def ternary_dot_or_xla(x: jax.Array, packed: jax.Array, n_out: int) -> jax.Array:
    """`ternary_dot` for up to MAX_ROWS rows where available, else unpack to int8 codes and take
    `cpu_int8.int8_dot_or_xla` (the same integers either way)."""
    if available() and math.prod(x.shape[:-1]) <= MAX_ROWS:
        return ternary_dot(x, packed, n_out)
    codes = packing.unpack_2bit(packed, n_out, jnp.int8, validate=False)
    return cpu_int8.int8_dot_or_xla(x, codes)


def bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) bf16 @ w (K, N) bf16 -> (..., N) float32. Needs `available()`."""
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise TypeError(f"bf16_dot wants bf16 operands, got {x.dtype} and {w.dtype}")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"bf16_dot: x {x.shape} and w {w.shape} (want x (..., K), w (K, N))")
    if not available():
        raise RuntimeError("bitnet_jax.core.cpu_decode kernels unavailable: "
                           f"{unavailable_reason()}")
    lead, n_out = x.shape[:-1], w.shape[1]
    rows = math.prod(lead)
    out = jax.ffi.ffi_call(BF16_TARGET_NAME, jax.ShapeDtypeStruct((rows, n_out), jnp.float32))(
        x.reshape(rows, x.shape[-1]), w)
    return out.reshape(*lead, n_out)


def bf16_dot_or_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """`bf16_dot` for up to MAX_ROWS rows where available, else XLA's dot (float32 sums)."""
    if available() and math.prod(x.shape[:-1]) <= MAX_ROWS:
        return bf16_dot(x, w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
