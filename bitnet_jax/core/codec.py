"""The ternary codec: float kernels <-> ternary codes and scales <-> packed bytes.

One home for every conversion the storage formats need (run directories keep float kernels;
Hugging Face BitLinear files, packed checkpoints and stored inference weights keep codes):

* `ternary_codes`: a float `(in, out)` kernel -> int8 codes in the torch `(out, in)` layout and
  the float32 absmean scale `gamma`, exactly as the model's forward pass quantizes it
  (`matmul.quantize_weight`: `quant.ternary_absmean` reduced in our `(in, out)` layout, or our
  kernel on CPUs, so a weight on a rounding boundary gets the code our model gives it);
* `torch_codes`: any quantizer's codes `(in, out)` -> int8 `(out, in)`;
* `pack_codes` / `unpack_codes`: int8 `(out, in)` codes <-> uint8 bytes (`packing`'s 2bit
  layout, transformers' own, or base3);
* `exact_latent`: codes and gamma -> a float32 kernel that quantizes back to exactly them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import matmul, packing, quant
from bitnet_jax.core.precision import WeightQuantizer

__all__ = ["ternary_codes", "torch_codes", "pack_codes", "unpack_codes", "packed_shape",
           "exact_latent"]

# For exact_latent's checks, whose sums are exact in any order: one compiled kernel per shape
# instead of one dispatch per jnp op; granularity and group size are static (reduction axes).
_quantize = jax.jit(quant.ternary_absmean, static_argnums=(1, 2))
_latent = jax.jit(quant.ternary_latent, static_argnums=(2, 3))


def torch_codes(codes_IxO: Any) -> Any:
    """Codes of an `(in, out)` kernel as int8 `(out, in)` (numpy in, numpy out; jax stays jax,
    so this also runs inside `jax.jit`)."""
    if isinstance(codes_IxO, jax.Array):
        return jnp.asarray(codes_IxO.T, jnp.int8)
    return np.ascontiguousarray(np.asarray(codes_IxO, np.int8).T)


def ternary_codes(kernel_IxO: Any, granularity: str = "tensor",
                  group_size: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """A float `(in, out)` kernel -> (int8 codes `(out, in)`, float32 gamma shaped as
    `quant.ternary_absmean` returns it)."""
    # Op by op, as the model's own (un-jitted) forward runs it: a jitted copy of XLA's formula
    # fuses the mean's reduction differently and can give gamma one ulp apart.
    q = matmul.quantize_weight(WeightQuantizer("ternary", 1.58, granularity, group_size),
                               jnp.asarray(kernel_IxO, jnp.float32))
    return torch_codes(np.asarray(q.codes)), np.asarray(q.scale, np.float32)


def pack_codes(codes_OxI: Any, layout: str) -> np.ndarray:
    """int8 codes `(out, in)` -> uint8: 2bit packs axis 0, 4 a byte (transformers' BitNet
    `weight`, `(ceil(out/4), in)`); base3 flattens in C order, 5 a byte (`ceil(out*in/5)`)."""
    if layout == "2bit":
        return packing.pack_2bit(codes_OxI)
    return packing.pack_base3(np.asarray(codes_OxI))


def unpack_codes(packed: np.ndarray, shape_OxI: tuple[int, int], layout: str) -> np.ndarray:
    """Inverse of `pack_codes`: int8 codes `(out, in)`. ValueError on bytes no code makes."""
    if layout == "2bit":
        return packing.unpack_2bit(packed, shape_OxI[0], np.int8)
    return packing.unpack_base3(packed, tuple(shape_OxI), np.int8)


def packed_shape(shape_OxI: tuple[int, int], layout: str) -> tuple[int, ...]:
    """Shape of `pack_codes`' bytes for codes `(out, in)`."""
    n_out, n_in = shape_OxI
    if layout == "2bit":
        return (-(-n_out // 4), n_in)
    return (-(-(n_in * n_out) // 5),)


def _scale_groups(x: np.ndarray, granularity: str, group_size: int | None) -> np.ndarray:
    """View an `(in, out)` kernel as `(groups, members, columns)`: one scale per (group, column)."""
    if granularity == "tensor":
        return x.reshape(1, -1, 1)
    if granularity == "channel":
        return x.reshape(1, *x.shape)
    return x.reshape(x.shape[0] // group_size, group_size, x.shape[1])


def exact_latent(codes: Any, gamma: Any, granularity: str = "tensor",
                 group_size: int | None = None, max_steps: int = 8) -> np.ndarray:
    """Float32 `(in, out)` weights that `quant.ternary_absmean` maps to exactly `codes`, `gamma`.

    `quant.ternary_latent` (W = codes * gamma / p) is exact in real numbers, but in float32
    mean|W| can land one ulp off gamma. Here every |W| is a multiple of q = ulp(S), S the float32
    sum that mean|W| = S / n must have: then every partial sum is a multiple of q below 2**24 q,
    exact in any summation order, and the mean is S / n on any backend. S starts at gamma * n
    and moves an ulp at a time until the mean is gamma (division is monotone, and gamma, being
    some float32 sum over n, is reachable). A scale group with more nonzero codes than S / q
    (at least 2**23) cannot be built so: it falls back to `quant.ternary_latent` (codes exact,
    scale possibly one ulp off), e.g. the per-tensor MLP kernels of a 2B model.
    """
    codes = np.asarray(codes, np.float32)
    grouped = _scale_groups(codes, granularity, group_size)
    target = np.asarray(gamma, np.float32).reshape(grouped.shape[0], 1, grouped.shape[2])
    nonzero = grouped != 0
    count = np.maximum(nonzero.sum(axis=1, keepdims=True), 1)
    rank = np.cumsum(nonzero, axis=1) - 1
    total = (target.astype(np.float64) * grouped.shape[1]).astype(np.float32)
    for _ in range(max_steps):
        quantum = np.spacing(total).astype(np.float64)
        units = np.rint(total / quantum).astype(np.int64)  # < 2**24: S is a multiple of its ulp
        if np.any(units < count):  # more nonzero codes than units: some |W| would be 0
            break
        # Spread the units over the nonzero codes: each gets units // count, some one more.
        multiple = units // count + (rank < units % count)
        w = np.where(nonzero, grouped * (multiple * quantum), 0.0).astype(np.float32)
        w = w.reshape(codes.shape)
        requant = _quantize(jnp.asarray(w), granularity, group_size)
        scale = np.asarray(requant.scale).reshape(target.shape)
        if np.array_equal(scale, target):
            if np.array_equal(np.asarray(requant.codes), codes):
                return w
            break  # a zero multiple changed a code: the group is too large for this scheme
        up, down = np.float32(np.inf), np.float32(-np.inf)
        total = np.where(scale > target, np.nextafter(total, down),
                         np.where(scale < target, np.nextafter(total, up), total))
    return np.asarray(_latent(jnp.asarray(codes), jnp.asarray(gamma, jnp.float32),
                              granularity, group_size))
