"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

from bitnet_jax.core.order_statistics import kth_largest, smallest_with_mass_above_below
from bitnet_jax.errors import require


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest
    set of most likely tokens whose probability reaches p."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        require(self.top_p is None or 0 < self.top_p <= 1,
                f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def keep_top_k(logits_BxV: jax.Array, k: int) -> jax.Array:
    """Logits below the k-th largest of each row set to -inf (ties with it are kept). The k-th
    largest without a sort on CPUs (`order_statistics`: 8 rows of 32,000 logits in 0.54 ms in
    our kernel, 2.5 in XLA's passes, 37 by `lax.top_k`, 2-core Xeon, 2026-12-05), `lax.top_k`'s
    value either way."""
    k = min(k, logits_BxV.shape[-1])
    threshold = kth_largest(logits_BxV, k)
    return jnp.where(logits_BxV >= threshold, logits_BxV, -jnp.inf)


def keep_top_p(logits_BxV: jax.Array, p: float) -> jax.Array:
    """Keep the most likely tokens until their probability reaches p (at least one token, ties
    with the last one kept): the logits at or above the smallest v such that the tokens above v
    hold less than p, found without a sort (`order_statistics`: 8 rows of 32,000 logits in 3.8
    against 49 ms, 2-core Xeon, 2026-12-05)."""
    probs = jax.nn.softmax(logits_BxV.astype(jnp.promote_types(logits_BxV.dtype, jnp.float32)),
                           axis=-1)
    threshold = smallest_with_mass_above_below(logits_BxV, probs, p)
    return jnp.where(logits_BxV >= threshold, logits_BxV, -jnp.inf)


def sample(logits_BxV: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """Token ids (B,) int32 drawn from float logits (B, V)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if config.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / config.temperature
    if config.top_k is not None:
        logits_BxV = keep_top_k(logits_BxV, config.top_k)
    if config.top_p is not None and config.top_p < 1:
        logits_BxV = keep_top_p(logits_BxV, config.top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)
