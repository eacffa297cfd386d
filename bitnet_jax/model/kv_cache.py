"""The key/value cache of autoregressive decoding, as plain arrays (a pytree that jit donates).

Layout: prompts are left-padded to one length, so every row writes its next token into the same
slot `index`; `start[b]` is the first slot that holds a real token of row b. Slot s is visible
to a query in slot t of row b when start[b] <= s <= t. A token's position (for RoPE) is its
slot minus its row's start, so padding changes nothing about the real tokens.

With a quantized KV cache (BitNet a4.8's 3-bit keys/values, 4-bit at the BOS position), keys
and values are stored as int8 codes with one float32 scale per token and head, and read back as
codes * scale: the same numbers the training-time fake quantization gives.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from bitnet_jax.core import quant
from bitnet_jax.core.precision import KVCachePrecision


@flax.struct.dataclass
class LayerCache:
    keys: jax.Array  # (B, S, K, H): values in the compute dtype, or int8 codes
    values: jax.Array
    key_scales: Optional[jax.Array] = None  # (B, S, K, 1) float32 when quantized
    value_scales: Optional[jax.Array] = None


@flax.struct.dataclass
class KVCache:
    layers: tuple  # one LayerCache per decoder block
    index: jax.Array  # int32 scalar: the slot the next token goes to
    start: jax.Array  # int32 (B,): first real slot of each row

    def positions(self, length: int) -> jax.Array:
        """RoPE positions (B, length) of the next `length` tokens (0 for padding slots)."""
        slots = self.index + jnp.arange(length)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)

    def advance(self, layers: tuple, length: int) -> "KVCache":
        return self.replace(layers=layers, index=self.index + length)


def init_cache(n_layers: int, batch: int, max_length: int, n_kv_heads: int, head_dim: int,
               dtype, kv: Optional[KVCachePrecision] = None,
               start: Optional[jax.Array] = None) -> KVCache:
    """An empty cache of `max_length` slots; `start` defaults to 0 (no padding)."""
    shape = (batch, max_length, n_kv_heads, head_dim)

    def layer() -> LayerCache:
        if kv is None:
            return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        scales = shape[:-1] + (1,)  # separate buffers: the decode step donates each one
        return LayerCache(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                          jnp.ones(scales, jnp.float32), jnp.ones(scales, jnp.float32))

    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(tuple(layer() for _ in range(n_layers)), jnp.zeros((), jnp.int32), start)


def quantize(x_BxTxKxH: jax.Array, positions_BxT: Optional[jax.Array],
             kv: KVCachePrecision) -> quant.Quantized:
    """Per token-and-head absmax codes (float32) and scales, the BOS position at `kv.bos_bits`
    if set. `positions_BxT=None` means positions 0..T-1 (BOS is the first of each row).

    The one definition of a quantized KV cache: the cache stores these codes, and training
    fake-quantizes keys and values with them (`layers.quantize_kv`)."""
    main = quant.absmax_per_token(x_BxTxKxH, kv.bits)
    if kv.bos_bits is None:
        return main
    bos = quant.absmax_per_token(x_BxTxKxH, kv.bos_bits)
    if positions_BxT is None:
        positions_BxT = jnp.arange(x_BxTxKxH.shape[1])[None, :]
    is_bos = (positions_BxT == 0)[:, :, None, None]
    return quant.Quantized(jnp.where(is_bos, bos.codes, main.codes),
                           jnp.where(is_bos, bos.scale, main.scale))


def _write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, index, 0, 0))


def update_layer(layer: LayerCache, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                 index: jax.Array, positions_BxT: jax.Array,
                 kv: Optional[KVCachePrecision]) -> LayerCache:
    """The layer's cache with the new keys/values (after RoPE) written from slot `index`."""
    if kv is None:
        return LayerCache(_write(layer.keys, k_BxTxKxH, index),
                          _write(layer.values, v_BxTxKxH, index))
    k, v = quantize(k_BxTxKxH, positions_BxT, kv), quantize(v_BxTxKxH, positions_BxT, kv)
    return LayerCache(_write(layer.keys, k.codes, index), _write(layer.values, v.codes, index),
                      _write(layer.key_scales, k.scale, index),
                      _write(layer.value_scales, v.scale, index))


def read_layer(layer: LayerCache, dtype) -> tuple[jax.Array, jax.Array]:
    """All keys and values (B, S, K, H) in `dtype`."""
    if layer.key_scales is None:
        return layer.keys.astype(dtype), layer.values.astype(dtype)
    return ((layer.keys * layer.key_scales).astype(dtype),
            (layer.values * layer.value_scales).astype(dtype))


def attention_mask(start_B: jax.Array, index: jax.Array, length: int,
                   max_length: int) -> jax.Array:
    """(B, 1, length, max_length) booleans: which cache slots each new query may attend to."""
    query_slots = index + jnp.arange(length)
    slots = jnp.arange(max_length)
    causal = slots[None, :] <= query_slots[:, None]
    real = slots[None, :] >= start_B[:, None]
    return (causal[None, :, :] & real[:, None, :])[:, None]
