"""Quantizers of the BitNet family as pure jnp functions (the matmul over their codes: `matmul`).

Every quantizer maps an array to a `Quantized` pair (integer-valued codes, float32 scale) with
`value ~= codes * scale`; `.dequantize()` gives the fake-quantized array. Scales are computed in
float32 whatever the input dtype, and fake-quantized results come back in the input dtype.
Reductions are plain `jnp` reductions, so under `jax.jit` a per-tensor mean over a sharded weight
is the global mean (GSPMD inserts the all-reduce).

Conventions: weights are Flax kernels `(in_features, out_features)`; activations have their
feature axis last ("per token" = one scale per row of the last axis). Formulas: see
shared/reference/bitnet.md; each function names the paper it transcribes.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bitnet_jax.core.order_statistics import kth_largest

EPS = 1e-5
F32 = jnp.float32


class Quantized(NamedTuple):
    """Integer-valued `codes` (float32 storage) and a float32 `scale`: value = codes * scale.

    `scale` broadcasts against `codes`, except for per-group weight scales, which have shape
    `(groups, 1, out)` for codes `(in, out)` (groups of consecutive input features).
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def is_grouped(self) -> bool:
        return self.scale.ndim == self.codes.ndim + 1

    def dequantize(self, dtype=F32) -> jax.Array:
        if self.is_grouped:
            n_in, n_out = self.codes.shape
            grouped = self.codes.reshape(self.scale.shape[0], -1, n_out) * self.scale
            return grouped.reshape(n_in, n_out).astype(dtype)
        return (self.codes * self.scale).astype(dtype)


# A quantizer is any hashable callable array -> Quantized (precision.py builds them from recipes).
Quantizer = Callable[[jax.Array], Quantized]


def round_clip(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """RoundClip(x, lo, hi) = max(lo, min(hi, round(x))), round half to even as numpy does."""
    return jnp.clip(jnp.round(x), lo, hi)


def ste(x: jax.Array, quantized: jax.Array) -> jax.Array:
    """Straight-through estimator: forward value `quantized`, gradient exactly identity.

    Written as `x - sg(x) + sg(q)` rather than `x + sg(q - x)`: in bfloat16 the latter rounds
    `q - x` and does not give back `q` exactly.
    """
    return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(quantized.astype(x.dtype))


def fake_quantize(quantizer: Quantizer, x: jax.Array) -> jax.Array:
    """Quantize-dequantize `x` with an STE gradient, in `x`'s dtype.

    The quantizer sees `x` without its tangent: its gradient is not taken anyway, and JAX
    differentiates the two-output reduction of `row_absmax` as a tree of slices, which XLA:CPU
    ran behind a float32 transposed copy of the activations (a4.8's 3-bit KV fake quantization;
    docs/cpu_training_step_history.md)."""
    return ste(x, quantizer(jax.lax.stop_gradient(x)).dequantize(x.dtype))


# ----------------------------------------------------------------------------------------------
# Weights: per tensor (default), per output channel, or per group of `group_size` input features.


def _weight_reduce(w: jax.Array, fn, granularity: str, group_size: Optional[int]) -> jax.Array:
    """Reduce `fn` (a jnp reduction) over the axes a weight scale is shared across.

    Returns the statistic shaped to broadcast against `w` (or `(groups, 1, out)` for groups).
    """
    if granularity == "tensor":
        return fn(w)
    if granularity == "channel":  # one scale per output feature (last axis)
        return fn(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
    if granularity == "group":
        if w.ndim != 2 or not group_size or w.shape[0] % group_size:
            raise ValueError(
                f"group granularity needs a 2-D kernel whose input size is a multiple of "
                f"group_size; got shape {w.shape} and group_size={group_size}"
            )
        grouped = w.reshape(w.shape[0] // group_size, group_size, w.shape[1])
        return fn(grouped, axis=1, keepdims=True)
    raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}")


def _apply_grouped(w: jax.Array, stat: jax.Array, fn) -> jax.Array:
    """Apply elementwise `fn(w, stat)` where `stat` may be per-group `(G, 1, out)`."""
    if stat.ndim == w.ndim + 1:
        grouped = w.reshape(stat.shape[0], -1, w.shape[-1])
        return fn(grouped, stat).reshape(w.shape)
    return fn(w, stat)


def ternary_round(w32: jax.Array, gamma: jax.Array) -> jax.Array:
    """b1.58's codes for a scale: RoundClip(W * (1 / gamma), -1, 1) (the kernels' order too)."""
    return round_clip(w32 * (1.0 / gamma), -1, 1)


def ternary_absmean(
    w: jax.Array, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """BitNet b1.58 ternary weights: gamma = max(mean|W|, eps), codes = RoundClip(W/gamma, -1, 1).

    Follows the released code (gamma clamped to 1e-5 instead of adding eps).
    """
    w32 = w.astype(F32)
    gamma = jnp.maximum(_weight_reduce(jnp.abs(w32), jnp.mean, granularity, group_size), EPS)
    codes = _apply_grouped(w32, gamma, ternary_round)
    return Quantized(codes, gamma)


def ternary_latent(
    codes: jax.Array, gamma: jax.Array, granularity: str = "tensor",
    group_size: Optional[int] = None,
) -> jax.Array:
    """Float weights that `ternary_absmean` maps back to exactly these `codes` and scale `gamma`.

    Released ternary checkpoints store codes and a scale, while training keeps float weights.
    W = codes * gamma / p, with p the fraction of nonzero codes (per scale group), has
    mean|W| = gamma and |W| / gamma = 1 / p >= 1 where codes are nonzero, which rounds and clips
    back to +-1: importing such a checkpoint and training on from it starts from the same model.
    """
    codes32 = codes.astype(F32)
    nonzero = _weight_reduce(jnp.abs(codes32), jnp.mean, granularity, group_size)
    scale = jnp.asarray(gamma, F32) / jnp.where(nonzero > 0, nonzero, 1.0)
    return _apply_grouped(codes32, scale, lambda c, s: c * s)


def binary_sign(
    w: jax.Array, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """BitNet (2023) binary weights: codes = Sign(W - mean(W)) with Sign(0) = -1, scale mean|W|."""
    w32 = w.astype(F32)
    alpha = _weight_reduce(w32, jnp.mean, granularity, group_size)
    beta = _weight_reduce(jnp.abs(w32), jnp.mean, granularity, group_size)
    codes = _apply_grouped(w32, alpha, lambda v, a: jnp.where(v - a > 0, 1.0, -1.0))
    return Quantized(codes, beta)


def absmax_weight(
    w: jax.Array, bits: int, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """Symmetric k-bit absmax weights (for generic wXaY sweeps): codes in [-(2^(k-1)-1), 2^(k-1)-1]."""
    q_max = 2 ** (bits - 1) - 1
    w32 = w.astype(F32)
    absmax = jnp.maximum(_weight_reduce(jnp.abs(w32), jnp.max, granularity, group_size), EPS)
    codes = _apply_grouped(w32, absmax, lambda v, m: round_clip(v * (q_max / m), -q_max, q_max))
    return Quantized(codes, absmax / q_max)


# ----------------------------------------------------------------------------------------------
# Activations: per token (one scale per row of the last axis).


def absmax_per_token(x: jax.Array, bits: int = 8) -> Quantized:
    """BitNet b1.58 k-bit absmax activations, no zero point.

    s = Q / max(max|x|, eps) with Q = 2^(k-1) - 1; codes = clip(round(x * s), -Q - 1, Q).
    """
    lo, q_max = code_range(bits)
    x32 = x.astype(F32)
    multiplier, scale = absmax_row_parameters(x32, q_max, floor=EPS)
    codes = round_clip(x32 * multiplier, lo, q_max)
    return Quantized(codes, scale)


def absmean_per_token(x: jax.Array, bits: int = 4) -> Quantized:
    """BitNet a4.8 absmean activations: Q4(x) = beta/sqrt(7) * RoundClip(sqrt(7) x / (beta + eps), -8, 7).

    beta = mean|x| per token. For other bit widths sqrt(7) generalises to sqrt(2^(k-1) - 1).
    """
    x32 = x.astype(F32)
    multiplier, scale = absmean_row_parameters(x32, bits)
    codes = round_clip(x32 * multiplier, *code_range(bits))
    return Quantized(codes, scale)


def code_range(bits: int) -> tuple[int, int]:
    """Codes of k-bit per-token activations (absmax and absmean alike): [-2^(k-1), 2^(k-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def absmax_row_parameters(x32: jax.Array, q_max: int, floor: float
                          ) -> tuple[jax.Array, jax.Array]:
    """(multiplier taking x to codes, scale taking codes back), each (..., 1), for absmax rows:
    max|x| raised to at least `floor`, or with floor 0 an all-zero row taken as 1. The CPU
    kernel (`cpu_int8_fused.absmax_quant_dot`) computes the same numbers."""
    absmax = row_absmax(x32)
    absmax = jnp.maximum(absmax, floor) if floor > 0 else jnp.where(absmax > 0, absmax, 1.0)
    # q_max * (1 / absmax), not q_max / absmax: the reference code (and transformers) writes
    # `127 / t` in torch, which evaluates `t.reciprocal() * 127`; dividing differs by an ulp for
    # a quarter of tokens and moves a code by one where x * scale sits on a .5 tie.
    return jnp.reciprocal(absmax) * q_max, absmax / q_max


def row_absmax(x: jax.Array) -> jax.Array:
    """max|x| over the last axis, (..., 1), as max(max x, -min x) from one two-output reduction:
    XLA:CPU hands a lone max-reduction to its library (YNNPACK) behind a pass writing a float32
    copy of the activations, and keeps this one in its own loop (docs/cpu_training_step_history.md:
    the quantizer alone in 0.33-0.72x the time)."""
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(jnp.inf, x.dtype))
    high, low = jax.lax.reduce(
        (x, x), init, lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (x.ndim - 1,))
    return jnp.maximum(high, -low)[..., None]


def absmean_row_parameters(x32: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """(multiplier taking x to codes, scale taking codes back), each (..., 1), for absmean."""
    root = math.sqrt(2 ** (bits - 1) - 1)
    beta = jnp.mean(jnp.abs(x32), axis=-1, keepdims=True)
    return root / (beta + EPS), beta / root


def topk_count(n: int, keep_ratio: float) -> int:
    """Entries kept per token: ceil(keep_ratio * n), at least 1 (guarding float fuzz: 0.3*10)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return min(n, max(1, math.ceil(keep_ratio * n - 1e-9)))


def topk_per_token(x: jax.Array, keep_ratio: float = 0.5) -> jax.Array:
    """BitNet a4.8 TopK sparsification: keep the k = ceil(ratio * n) largest |x| of each token.

    Entries tied with the k-th largest magnitude are all kept (a threshold, not a scatter: cheap and
    elementwise, so it shards like any activation; found without a sort on CPUs:
    `order_statistics`).
    """
    k = topk_count(x.shape[-1], keep_ratio)
    if k == x.shape[-1]:
        return x
    magnitude = jnp.abs(x)
    threshold = kth_largest(magnitude, k)
    return jnp.where(magnitude >= threshold, x, jnp.zeros_like(x))
