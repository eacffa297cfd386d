"""Causal softmax attention for training on CPUs: XLA's own products, in layouts it runs fast.

The arithmetic is `jax.nn.dot_product_attention`'s XLA version (logits and softmax in float32,
probabilities rounded to the value dtype for the product with the values). What differs is the
layout of its six batched products (two forward, four backward), and so their speed on XLA:CPU:
its fast bf16 library path (YNNPACK) takes a product only when the left operand contracts its
last axis and the right one its first non-batch axis, both row-major (`IsDotSupportedByYnn`);
any other product is converted to float32 and runs at half the rate or less. Autodiff of the
einsums in `jax.nn` yields such products in the backward, so this module writes its own VJP
(`jax.custom_vjp`), with every operand copied into the layout its product wants. The copies are
of (tokens x head_dim) tensors, small beside the (tokens x tokens) scores. Measured on a 2-core
Zen 4 (2026-12-03, `scripts/bench_train.py --modes bf16,bf16-xla-attention`, 20 rounds): with
`jax.nn`'s attention a bf16 train step takes 1.16x (ladder-20m), 1.20x (6.4m) and 1.28x (1.6m)
as long.

One numerical difference from `jax.nn` on CPU: there, XLA's float32 products let it drop the
bf16 rounding of the probabilities (its `xla_allow_excess_precision`); here they are rounded,
as the written program says and as accelerators compute it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
# What `jax.nn.dot_product_attention` writes into masked logits (finite, unlike -inf).
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


def causal_attention_block(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                           q_offset: int = 0, scale: Optional[float] = None) -> jax.Array:
    """Softmax attention of the queries at positions q_offset, q_offset + 1, ... to the keys at
    positions 0..S-1, each query seeing the keys at or before its own position.

    Grouped-query attention (K key/value heads for N = K * G query heads) repeats each key and
    value head G times. `scale` multiplies q.k (None: 1/sqrt(head_dim)).
    """
    n_heads, n_kv_heads = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
    if n_heads != n_kv_heads:
        k_BxSxKxH = jnp.repeat(k_BxSxKxH, n_heads // n_kv_heads, axis=2)
        v_BxSxKxH = jnp.repeat(v_BxSxKxH, n_heads // n_kv_heads, axis=2)
    if scale is None:
        scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    return _attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_offset, float(scale))


def _copy_transposed(x: jax.Array, permutation: tuple[int, ...]) -> jax.Array:
    """`x` transposed as a physical row-major copy.

    Through a trailing unit axis: XLA folds a plain transpose into the product's dimension
    numbers, which gives back the layout that the library path refuses.
    """
    moved = jax.lax.transpose(x[..., None], (*permutation, x.ndim))
    return moved.reshape(moved.shape[:-1])


def _batched_dot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """(B, N, M, C) x (B, N, C, P) -> (B, N, M, P) in float32: both operands in the layout that
    XLA:CPU's library path takes."""
    return jax.lax.dot_general(lhs, rhs, (((3,), (2,)), ((0, 1), (0, 1))),
                               preferred_element_type=F32)


def visible_keys(q_offset: int, q_len: int, k_len: int) -> jax.Array:
    """Causal mask: query i (at position q_offset + i) sees key j iff j <= q_offset + i."""
    return (q_offset + jnp.arange(q_len))[:, None] >= jnp.arange(k_len)[None, :]


def _heads_first(x_BxTxNxH: jax.Array) -> jax.Array:
    return _copy_transposed(x_BxTxNxH, (0, 2, 1, 3))  # B N T H


def _heads_first_transposed(x_BxTxNxH: jax.Array) -> jax.Array:
    return _copy_transposed(x_BxTxNxH, (0, 2, 3, 1))  # B N H T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, q_offset, scale):
    return _attention_fwd(q, k, v, q_offset, scale)[0]


def _attention_fwd(q, k, v, q_offset, scale):
    visible = visible_keys(q_offset, q.shape[1], k.shape[1])
    logits = _batched_dot(_heads_first(q), _heads_first_transposed(k)) * jnp.asarray(scale, F32)
    probs = jax.nn.softmax(jnp.where(visible, logits, _MASKED_LOGIT), axis=-1)  # B N T S, f32
    out = _batched_dot(probs.astype(v.dtype), _heads_first(v)).astype(v.dtype)
    return jnp.transpose(out, (0, 2, 1, 3)), (q, k, v, probs)


def _attention_bwd(q_offset, scale, residuals, g_BxTxNxH):
    q, k, v, probs = residuals
    dtype = v.dtype
    visible = visible_keys(q_offset, q.shape[1], k.shape[1])
    # d(probs): rounded to the value dtype, as the forward product's result was.
    d_probs = _batched_dot(_heads_first(g_BxTxNxH), _heads_first_transposed(v))
    d_probs = d_probs.astype(dtype).astype(F32)
    # dV^T = dO^T P (H x S per head): the left operand contracts its last axis this way round.
    d_v_BxNxHxS = _batched_dot(_heads_first_transposed(g_BxTxNxH), probs.astype(dtype))
    # Softmax backward in float32, as `jax.nn.softmax`'s own rule.
    d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_logits = (jnp.where(visible, d_logits, 0.0) * jnp.asarray(scale, F32)).astype(dtype)
    d_q = _batched_dot(d_logits, _heads_first(k))
    d_k_BxNxHxS = _batched_dot(_heads_first_transposed(q), d_logits)
    return (jnp.transpose(d_q.astype(q.dtype), (0, 2, 1, 3)),
            jnp.transpose(d_k_BxNxHxS.astype(k.dtype), (0, 3, 1, 2)),
            jnp.transpose(d_v_BxNxHxS.astype(dtype), (0, 3, 1, 2)))


_attention.defvjp(_attention_fwd, _attention_bwd)
