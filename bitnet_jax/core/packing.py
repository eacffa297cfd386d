"""Ternary weight packing: {-1, 0, 1} weights stored in uint8 bytes.

Two layouts are provided, both as pure functions that accept numpy arrays or
jax arrays (a jax input gives a jax output, so packed weights can be unpacked
on the fly inside ``jax.jit`` at inference time):

``"2bit"`` -- the layout of Hugging Face BitNet checkpoints
    (transformers ``BitNetForCausalLM``, e.g. microsoft/bitnet-b1.58-2B-4T;
    ``pack_weights`` / ``unpack_weights`` in
    ``transformers/integrations/bitnet.py``). 4 weights per byte, packed along
    axis 0 (the output-feature axis of a torch ``(out, in)`` weight):

    * code = value + 1, i.e. {-1, 0, 1} -> {0, 1, 2} (code 3 is invalid);
    * a weight of shape ``(rows, *rest)`` becomes uint8 ``(R, *rest)`` with
      ``R = ceil(rows / 4)``;
    * byte row ``r`` holds original rows ``r, r+R, r+2R, r+3R`` in bits
      ``[1:0], [3:2], [5:4], [7:6]`` respectively (row blocks, not
      interleaved neighbours);
    * slots past the last real row (``rows % 4 != 0``) are padding. NOTE:
      transformers leaves them as bits 00 (code 0, which decodes to -1), not
      value 0 / code 1 as our original spec said; we default to transformers'
      bytes (``pad_value=-1``) and offer ``pad_value=0``. Either way
      :func:`unpack_2bit` drops padding, and transformers' ``BitLinear``
      allocates ``out // 4`` rows, so in practice its checkpoints only have
      ``out % 4 == 0`` (true for every layer of bitnet-b1.58-2B-4T).

``"base3"`` -- 5 weights per byte (3**5 = 243 <= 256), 1.6 bits/weight
    against the log2(3) ~= 1.585 information limit:

    * flatten in C order, pad with value 0 to a multiple of 5;
    * for each group of 5 weights, digit ``d_i = value_i + 1`` and
      ``byte = sum_i d_i * 3**i`` (first weight = least significant digit);
    * result is 1-D uint8 of length ``ceil(n / 5)``; bytes >= 243 are invalid.

Value checks (values in {-1, 0, 1}, valid codes) need concrete data, so they
run on numpy arrays and concrete jax arrays but are skipped while tracing
(inside ``jax.jit``); shape and dtype checks always run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BITS_PER_WEIGHT",
    "LAYOUTS",
    "HF_PAD_VALUE",
    "pack_2bit",
    "unpack_2bit",
    "pack_base3",
    "unpack_base3",
    "packed_nbytes",
]

LAYOUTS: tuple[str, ...] = ("2bit", "base3")

# Storage cost per ternary weight, ignoring padding. "limit" is the entropy
# bound for a uniform ternary symbol, for comparison.
BITS_PER_WEIGHT: dict[str, float] = {
    "2bit": 2.0,
    "base3": 8.0 / 5.0,
    "limit": math.log2(3.0),
}

# transformers' pack_weights starts from a zero uint8 buffer and never writes
# the padding slots, so padding holds bits 00 = code 0, which unpacks to -1
# (not to 0). We reproduce that by default so our bytes equal theirs exactly.
HF_PAD_VALUE: int = -1

_VALUES_PER_BYTE_2BIT = 4
_VALUES_PER_BYTE_BASE3 = 5
_BASE3_MAX_BYTE = 3**_VALUES_PER_BYTE_BASE3 - 1  # 242


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _xp(x: Any) -> Any:
    """Array namespace for ``x``: jax.numpy for jax arrays (tracers too), else numpy."""
    return jnp if isinstance(x, jax.Array) else np


def _as_array(x: Any) -> Any:
    """Leave jax arrays alone (they may be tracers); turn anything else into numpy."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _is_concrete(x: Any) -> bool:
    """True when the values of ``x`` can be inspected (not a tracer under jit)."""
    return not isinstance(x, jax.core.Tracer)


def _all_ternary(w: Any) -> Any:
    xp = _xp(w)
    return xp.all((w == -1) | (w == 0) | (w == 1))  # NaN fails all three, as it should


def _no_code3(packed: Any) -> Any:
    # A 2-bit field is 3 iff both of its bits are set.
    return ~_xp(packed).any((packed & (packed >> 1) & np.uint8(0x55)) != 0)


def _all_base3_bytes(packed: Any) -> Any:
    return _xp(packed).all(packed <= np.uint8(_BASE3_MAX_BYTE))


def _holds(predicate: Callable[[Any], Any], x: Any) -> bool:
    """Evaluate a whole-array check; for jax, as one jitted kernel on device."""
    if isinstance(x, jax.Array):
        return bool(_JITTED[predicate](x))
    return bool(predicate(x))


def _run(kernel: Callable[..., Any], x: Any, *static: Any) -> Any:
    """Call ``kernel(x, *static)``; jax inputs go through its jitted version.

    Eager jnp would dispatch (and compile) every small op separately; one
    jitted kernel per shape is much cheaper. Under an outer jit this inlines.
    """
    if isinstance(x, jax.Array):
        return _JITTED[kernel](x, *static)
    return kernel(x, *static)


def _check_ternary(w: Any) -> None:
    """Raise ValueError unless ``w`` is real-valued with every entry in {-1, 0, 1}."""
    dt = np.dtype(w.dtype)
    # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, float8_*).
    if not (jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.floating)):
        raise ValueError(
            f"ternary weights must have an integer or floating dtype, got {dt}"
        )
    if not _is_concrete(w) or w.size == 0:
        return
    if not _holds(_all_ternary, w):
        w_np = np.asarray(w)
        bad = w_np[~((w_np == -1) | (w_np == 0) | (w_np == 1))]
        raise ValueError(
            f"weights must contain only values in {{-1, 0, 1}}; found {bad.size} "
            f"other value(s), e.g. {bad.flat[0].item()!r} (quantize to ternary first)"
        )


def _check_pad_value(pad_value: int) -> None:
    if pad_value not in (-1, 0, 1):
        raise ValueError(f"pad_value must be -1, 0 or 1, got {pad_value!r}")


def _check_uint8(packed: Any, layout: str) -> None:
    if np.dtype(packed.dtype) != np.uint8:
        raise ValueError(
            f"packed {layout} data must have dtype uint8, got {np.dtype(packed.dtype)}"
        )


def _check_out_dtype(dtype: Any) -> np.dtype:
    """Output dtype must hold -1: signed integer or floating (bf16 included)."""
    dt = np.dtype(dtype)
    if not (jnp.issubdtype(dt, jnp.signedinteger) or jnp.issubdtype(dt, jnp.floating)):
        raise ValueError(
            f"unpack dtype must be a signed integer or floating dtype, got {dt}"
        )
    return dt


def _codes_to_values(codes: Any, dtype: np.dtype) -> Any:
    """uint8 codes {0, 1, 2} -> values {-1, 0, 1} in ``dtype``."""
    # Subtract in int8 so uint8 never wraps, then cast once.
    return (codes.astype(np.int8) - np.int8(1)).astype(dtype)


def _normalize_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must have non-negative dims, got {shape}")
    return shape


# --------------------------------------------------------------------------
# 2-bit layout (Hugging Face BitNet)
# --------------------------------------------------------------------------


def _pack_2bit_kernel(w: Any, pad_code: int) -> Any:
    xp = _xp(w)
    rows = w.shape[0]
    R = -(-rows // _VALUES_PER_BYTE_2BIT)
    codes = (w.astype(np.int8) + np.int8(1)).astype(np.uint8)
    n_pad = _VALUES_PER_BYTE_2BIT * R - rows
    if n_pad:
        pad_width = [(0, n_pad)] + [(0, 0)] * (w.ndim - 1)
        codes = xp.pad(codes, pad_width, constant_values=np.uint8(pad_code))
    # (4R, *rest) -> (4, R, *rest): block k = rows [kR, (k+1)R) goes to bits 2k.
    blocks = codes.reshape((_VALUES_PER_BYTE_2BIT, R) + tuple(w.shape[1:]))
    return blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)


def _unpack_2bit_kernel(packed: Any, rows: int, dtype: np.dtype) -> Any:
    xp = _xp(packed)
    R = packed.shape[0]
    fields = [(packed >> (2 * k)) & np.uint8(3) for k in range(_VALUES_PER_BYTE_2BIT)]
    # Stacking the 4 row blocks on a new leading axis then merging restores row order.
    codes = xp.stack(fields, axis=0).reshape((_VALUES_PER_BYTE_2BIT * R,) + tuple(packed.shape[1:]))
    return _codes_to_values(codes[:rows], dtype)


def pack_2bit(w: Any, *, pad_value: int = HF_PAD_VALUE) -> Any:
    """Pack ternary ``w`` of shape ``(rows, *rest)`` into uint8 ``(ceil(rows/4), *rest)``.

    Layout (identical to transformers' ``pack_weights``): code = value + 1;
    byte row ``r`` holds rows ``r, r+R, r+2R, r+3R`` (``R = ceil(rows/4)``) in
    bits ``[1:0], [3:2], [5:4], [7:6]``. Works for 1-D and N-D arrays; only
    axis 0 is packed, trailing dims are kept.

    Args:
        w: ternary array (any integer/float dtype, values in {-1, 0, 1}),
            numpy or jax. For a torch-layout linear weight, shape ``(out, in)``.
        pad_value: value stored in padding slots when ``rows % 4 != 0``. The
            default -1 (bits 00) matches transformers byte for byte; pass 0 to
            store code 1 instead. Padding is dropped by :func:`unpack_2bit`.

    Returns:
        uint8 array (numpy or jax, like ``w``).
    """
    w = _as_array(w)
    if w.ndim == 0:
        raise ValueError("pack_2bit needs an array with at least 1 dim (packs axis 0)")
    _check_ternary(w)
    _check_pad_value(pad_value)
    return _run(_pack_2bit_kernel, w, pad_value + 1)


def unpack_2bit(
    packed: Any, rows: int, dtype: Any = np.int8, *, validate: bool = True
) -> Any:
    """Inverse of :func:`pack_2bit`: uint8 ``(ceil(rows/4), *rest)`` -> ``(rows, *rest)``.

    Padding slots are dropped whatever they hold (transformers' own
    ``unpack_weights`` keeps them and returns ``4 * R`` rows). ``rows`` and
    ``dtype`` must be static under ``jax.jit``.

    Args:
        packed: uint8 array, numpy or jax.
        rows: number of original rows (size of axis 0 before packing).
        dtype: output dtype; signed integer or floating (e.g. ``jnp.bfloat16``).
        validate: if True and ``packed`` is concrete, reject code 3 (bits 11),
            which no ternary value produces.

    Returns:
        array of ``dtype`` with values in {-1, 0, 1} (numpy or jax, like ``packed``).
    """
    packed = _as_array(packed)
    _check_uint8(packed, "2bit")
    if packed.ndim == 0:
        raise ValueError("packed 2bit data must have at least 1 dim")
    rows = int(rows)
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    R = packed.shape[0]
    if -(-rows // _VALUES_PER_BYTE_2BIT) != R:
        raise ValueError(
            f"rows={rows} does not fit packed axis 0 of size {R}: "
            f"expected ceil(rows/4) == {R}, i.e. rows in [{4 * R - 3}, {4 * R}]"
        )
    out_dtype = _check_out_dtype(dtype)
    if validate and _is_concrete(packed) and packed.size and not _holds(_no_code3, packed):
        raise ValueError("packed 2bit data contains code 3 (bits 11), not a ternary value")
    return _run(_unpack_2bit_kernel, packed, rows, out_dtype)


# --------------------------------------------------------------------------
# base-3 layout (5 weights per byte)
# --------------------------------------------------------------------------


def _pack_base3_kernel(w: Any) -> Any:
    xp = _xp(w)
    flat = (w.reshape(-1).astype(np.int8) + np.int8(1)).astype(np.uint8)
    n_pad = -flat.shape[0] % _VALUES_PER_BYTE_BASE3
    if n_pad:
        flat = xp.pad(flat, (0, n_pad), constant_values=np.uint8(1))  # value 0
    d = flat.reshape(-1, _VALUES_PER_BYTE_BASE3)
    # Horner form in uint8: every partial sum is <= 242, so nothing overflows.
    out = d[:, 4]
    for i in (3, 2, 1, 0):
        out = out * np.uint8(3) + d[:, i]
    return out


def _unpack_base3_kernel(packed: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    xp = _xp(packed)
    digits = []
    b = packed
    for _ in range(_VALUES_PER_BYTE_BASE3):
        digits.append(b % np.uint8(3))
        b = b // np.uint8(3)
    codes = xp.stack(digits, axis=1).reshape(-1)[: math.prod(shape)]
    return _codes_to_values(codes, dtype).reshape(shape)


def pack_base3(w: Any) -> Any:
    """Pack ternary ``w`` (any shape) into 1-D uint8 of length ``ceil(w.size / 5)``.

    Layout: flatten in C order, pad with value 0 to a multiple of 5; for each
    group of 5 weights, ``byte = sum_i (w_i + 1) * 3**i`` with the first weight
    as the least significant digit. Bytes lie in [0, 242]. The shape is not
    stored: keep it to unpack.
    """
    w = _as_array(w)
    _check_ternary(w)
    return _run(_pack_base3_kernel, w)


def unpack_base3(
    packed: Any,
    shape: int | Sequence[int],
    dtype: Any = np.int8,
    *,
    validate: bool = True,
) -> Any:
    """Inverse of :func:`pack_base3`: 1-D uint8 -> array of ``shape`` (padding dropped).

    ``shape`` and ``dtype`` must be static under ``jax.jit``. ``packed`` must
    have exactly ``ceil(prod(shape) / 5)`` bytes. With ``validate`` and
    concrete data, bytes > 242 (not a base-3 group) are rejected.
    """
    packed = _as_array(packed)
    _check_uint8(packed, "base3")
    shape = _normalize_shape(shape)
    n = math.prod(shape)
    n_bytes = -(-n // _VALUES_PER_BYTE_BASE3)
    if packed.ndim != 1 or packed.shape[0] != n_bytes:
        raise ValueError(
            f"shape {shape} ({n} weights) needs 1-D packed base3 data of "
            f"{n_bytes} bytes, got packed shape {tuple(packed.shape)}"
        )
    out_dtype = _check_out_dtype(dtype)
    if validate and _is_concrete(packed) and packed.size and not _holds(_all_base3_bytes, packed):
        raise ValueError(f"packed base3 data contains bytes > {_BASE3_MAX_BYTE}")
    return _run(_unpack_base3_kernel, packed, shape, out_dtype)


# Jitted twins of the kernels and checks, used for jax inputs (see _run).
# Everything after the array argument is static (shape/dtype/pad code).
_JITTED: dict[Callable[..., Any], Callable[..., Any]] = {
    fn: jax.jit(fn, static_argnums=tuple(range(1, nargs)))
    for fn, nargs in [
        (_pack_2bit_kernel, 2),
        (_unpack_2bit_kernel, 3),
        (_pack_base3_kernel, 1),
        (_unpack_base3_kernel, 3),
        (_all_ternary, 1),
        (_no_code3, 1),
        (_all_base3_bytes, 1),
    ]
}


# --------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------


def packed_nbytes(num_weights_or_shape: int | Sequence[int], layout: str) -> int:
    """Exact byte count of a weight packed in ``layout`` ("2bit" or "base3").

    An int is taken as a 1-D weight of that many elements. For "2bit" the
    shape matters: only axis 0 is padded, so ``(out, in)`` costs
    ``ceil(out/4) * in`` bytes, not ``ceil(out*in/4)``. "base3" costs
    ``ceil(size / 5)`` bytes for any shape.
    """
    shape = _normalize_shape(num_weights_or_shape)
    if layout == "2bit":
        if not shape:
            raise ValueError("2bit packing needs at least 1 dim; got a 0-d shape")
        return -(-shape[0] // _VALUES_PER_BYTE_2BIT) * math.prod(shape[1:])
    if layout == "base3":
        return -(-math.prod(shape) // _VALUES_PER_BYTE_BASE3)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
