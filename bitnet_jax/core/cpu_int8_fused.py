"""Activation quantization fused into the int8 product, and its backward, on x86 CPUs.

The entry points live in the same library as `cpu_int8` (`kernels/int8_matmul.cc`); this module
registers them and exposes::

    available() -> bool
    absmax_quant_dot(x, w_codes, w_scale, bits) -> (y, mult, scale)
    scaled_quant_dot(x, w_codes, w_scale, mult, scale, lo, hi) -> y
    quantize_transpose(x, mult, scale, lo, hi) -> X_q^T

x is bfloat16 (..., K), w_codes int8 (N, K) ("out x in"), w_scale float32 (N,). Each row of x is
quantized while the kernel takes it (codes = clip(round_half_even(x * mult), lo, hi)), so no int8
copy of the activations is written; y = bf16((codes @ w_codes.T) * scale * w_scale) is
bit-identical to `quant.quantized_dot`'s integer path. `absmax_quant_dot` computes the absmax
row parameters itself (mult = (1 / max(max|x|, 1e-5)) * q, scale = max(max|x|, 1e-5) * (1 / q)
with q = 2^(bits-1) - 1, as XLA computes `quant.absmax_per_token`) and returns them for the backward;
`scaled_quant_dot` takes them (absmean: a mean's rounding depends on the reduction order, so
XLA computes it as the unfused path does). `quantize_transpose` re-derives the codes from x and
writes bf16(codes * scale) transposed, the operand of the weight gradient. Activations must be
finite. Under `vmap` the calls run one batch element at a time.
"""

from __future__ import annotations

import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import cpu_int8

ABSMAX_QUANT_DOT_TARGET = "bitnet_absmax_quant_dot"
SCALED_QUANT_DOT_TARGET = "bitnet_scaled_quant_dot"
QUANTIZE_TRANSPOSE_TARGET = "bitnet_quantize_transpose"
_SYMBOLS = {ABSMAX_QUANT_DOT_TARGET: "BitnetAbsmaxQuantDot",
            SCALED_QUANT_DOT_TARGET: "BitnetScaledQuantDot",
            QUANTIZE_TRANSPOSE_TARGET: "BitnetQuantizeTranspose"}

_lock = threading.Lock()
_registered: bool | None = None


def available() -> bool:
    """Whether the fused entry points can be used (the `cpu_int8` kernel library is loaded)."""
    global _registered
    if _registered is None:
        with _lock:
            if _registered is None:
                lib = cpu_int8.shared_library()
                if lib is not None:
                    for target, symbol in _SYMBOLS.items():
                        jax.ffi.register_ffi_target(
                            target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _registered = lib is not None
    return _registered


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


def _rows(x):
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def absmax_quant_dot(x: jax.Array, w_codes: jax.Array, w_scale: jax.Array, bits: int = 8):
    """Per-token absmax quantization of x fused into x_q @ w.T: (y bf16 (..., N), mult, scale),
    mult and scale float32 of shape x.shape[:-1]."""
    _require(x, w_codes, w_scale)
    if not 2 <= bits <= 8:
        raise ValueError(f"absmax_quant_dot: bits must be 2..8, got {bits}")
    lead, rows, n = x.shape[:-1], math.prod(x.shape[:-1]), w_codes.shape[0]
    y, mult, scale = jax.ffi.ffi_call(
        ABSMAX_QUANT_DOT_TARGET,
        (jax.ShapeDtypeStruct((rows, n), jnp.bfloat16), jax.ShapeDtypeStruct((rows,), jnp.float32),
         jax.ShapeDtypeStruct((rows,), jnp.float32)),
        vmap_method="sequential",
    )(_rows(x), w_codes, w_scale, q_max=np.int32(2 ** (bits - 1) - 1))
    return y.reshape(*lead, n), mult.reshape(lead), scale.reshape(lead)


def scaled_quant_dot(x, w_codes, w_scale, mult, scale, lo: int, hi: int) -> jax.Array:
    """x quantized per row with the given `mult` and `scale` (shape x.shape[:-1]) fused into
    x_q @ w.T -> bf16 (..., N)."""
    _require(x, w_codes, w_scale)
    lead, rows, n = x.shape[:-1], math.prod(x.shape[:-1]), w_codes.shape[0]
    y = jax.ffi.ffi_call(SCALED_QUANT_DOT_TARGET, jax.ShapeDtypeStruct((rows, n), jnp.bfloat16),
                         vmap_method="sequential")(
        _rows(x), w_codes, w_scale, mult.reshape(rows).astype(jnp.float32),
        scale.reshape(rows).astype(jnp.float32), lo=np.int32(lo), hi=np.int32(hi))
    return y.reshape(*lead, n)


def quantize_transpose(x, mult, scale, lo: int, hi: int) -> jax.Array:
    """bf16(clip(round(x * mult), lo, hi) * scale) as (K, rows): X_q^T for the weight gradient."""
    _require(x)
    rows, k = math.prod(x.shape[:-1]), x.shape[-1]
    return jax.ffi.ffi_call(QUANTIZE_TRANSPOSE_TARGET,
                            jax.ShapeDtypeStruct((k, rows), jnp.bfloat16),
                            vmap_method="sequential")(
        _rows(x), mult.reshape(rows).astype(jnp.float32),
        scale.reshape(rows).astype(jnp.float32), lo=np.int32(lo), hi=np.int32(hi))
