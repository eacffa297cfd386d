"""The normalised fast Walsh-Hadamard transform that BitNet v2 applies to activations before
quantizing them (an orthogonal rotation that spreads outliers over the features)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.partial(jax.jit, static_argnames="block_size")  # one fused kernel, not log2(n) dispatches
def hadamard_transform(x: jax.Array, block_size: Optional[int] = None) -> jax.Array:
    """Normalised fast Walsh-Hadamard transform over the last axis (BitNet v2), O(n log n).

    Equals `x @ scipy.linalg.hadamard(n) / sqrt(n)` (Sylvester order). With `block_size`, the
    transform is applied independently to consecutive blocks of that (power-of-two) size, which
    lets widths like 6912 = 27 * 256 be rotated. Computed in float32, returned in `x`'s dtype.
    Being linear, its autodiff gradient is the transform of the gradient (H is symmetric).
    """
    n = x.shape[-1]
    block = n if block_size is None else block_size
    if not is_power_of_two(block) or n % block:
        raise ValueError(
            f"Hadamard transform needs a power-of-two size dividing the last axis; got size "
            f"{block} for an axis of {n}"
        )
    lead = x.shape[:-1]
    y = x.astype(jnp.float32).reshape(*lead, n // block, block)
    half = 1
    while half < block:  # butterfly: pair entries whose index differs in bit log2(half)
        y = y.reshape(*lead, n // block, block // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        half *= 2
    return (y.reshape(x.shape) / math.sqrt(block)).astype(x.dtype)


def largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def rotate_activations(x: jax.Array) -> jax.Array:
    """BitNet v2's rotation of a linear layer's input: the transform in blocks of the largest
    power of two dividing the width (the whole width where it is a power of two)."""
    return hadamard_transform(x, largest_power_of_two_divisor(x.shape[-1]))
