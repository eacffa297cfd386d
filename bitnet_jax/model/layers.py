"""Flax linen building blocks: BitLinear, RMSNorm, RoPE, causal GQA attention, gated MLPs.

Modules are thin: the arithmetic lives in `quant.py`. Every parameter carries logical axis names
(`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, `norm`) that sharding rules map to mesh axes.
Parameters are float32; `dtype` is the compute dtype (bfloat16 by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model import cpu_attention, kv_cache
from bitnet_jax.core import hadamard, matmul, packing, quant
from bitnet_jax.core.precision import HEAD_INT8, KVCachePrecision, LinearPrecision

Dtype = Any

# How a quantized BitLinear holds its weights: "float" kernels quantized on every call (training),
# or, for inference, "int8" codes (out, in) or "packed" 2-bit codes (HF layout, unpacked on the
# fly), each with a float32 scale. Unquantized layers always hold float kernels.
WEIGHT_FORMATS = ("float", "int8", "packed")
# How the output head is held for inference: "float" (as trained) or "int8" (`HEAD_INT8`).
HEAD_FORMATS = ("float", "int8")


def logical_init(init, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32, with a learned scale."""

    eps: float = 1e-5
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class BitLinear(nn.Module):
    """A bias-free linear layer whose weights and inputs are quantized as `precision` says.

    With the default `LinearPrecision()` it is an ordinary linear layer, so one module serves
    the bf16 baseline and every quantized recipe. Order of operations on the input:
    optional RMSNorm inside the layer (BitNet b1.58's BitLinear) -> optional Hadamard rotation
    (BitNet v2) -> activation quantizer (STE) -> matmul with the quantized weight -> rescale.

    `integer=True` runs the forward product as int8 x int8 -> int32 (same result, see
    `matmul.quantized_dot`); `int8_backward=True` also takes dx as an int8 product (not exact).
    `out_dtype` defaults to `dtype`. `weights` picks how quantized weights are held (see
    WEIGHT_FORMATS; `bitnet_jax.infer.generate.inference_params` converts).
    """

    features: int
    precision: LinearPrecision = LinearPrecision()
    kernel_axes: tuple[str, str] = ("embed", "mlp")
    inner_norm: bool = False
    norm_eps: float = 1e-5
    integer: bool = False
    dtype: Dtype = jnp.bfloat16
    out_dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(stddev=0.02)
    weights: str = "float"
    int8_backward: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        stored = self.weights != "float" and self.precision.weight is not None
        if stored:
            codes, scale = self._stored_weights(x.shape[-1])
        else:
            kernel = self.param("kernel", logical_init(self.kernel_init, self.kernel_axes),
                                (x.shape[-1], self.features), self.param_dtype)
        if self.inner_norm:
            x = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, self.kernel_axes[0],
                        name="norm")(x)
        if self.precision.hadamard:
            x = hadamard.rotate_activations(x)
        if stored:
            return matmul.codes_dot(x, codes, scale, self.precision.activation, self.dtype,
                                    self.integer, self.out_dtype)
        return matmul.quantized_dot(x, kernel, self.precision.activation, self.precision.weight,
                                    self.dtype, self.integer, self.int8_backward, self.out_dtype)

    def _stored_weights(self, n_in: int) -> tuple[jax.Array, jax.Array]:
        """Inference weights: int8 codes (out, in), or 2-bit packed and unpacked here."""
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        granularity = self.precision.weight.granularity
        if granularity == "group":
            raise ValueError("stored (int8/packed) weights support per-tensor and per-channel "
                             "scales; use weights='float' for per-group recipes")
        scale_shape = (self.features,) if granularity == "channel" else ()
        scale = self.param("scale", nn.initializers.ones, scale_shape, jnp.float32)
        if self.weights == "int8":
            return self.param("codes", nn.initializers.zeros, (self.features, n_in),
                              jnp.int8), scale
        packed = self.param("packed", nn.initializers.zeros, (-(-self.features // 4), n_in),
                            jnp.uint8)
        return packing.unpack_2bit(packed, self.features, jnp.int8, validate=False), scale


class Int8Embedding(nn.Module):
    """A tied embedding table held for inference as int8 codes (vocab, features) with one
    float32 scale per row (`HEAD_INT8`, from `infer.generate.int8_head_params`): looked up as
    codes x scale, and used as the output head through the integer product."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.bfloat16

    def setup(self):
        self.codes = self.param("codes", nn.initializers.zeros,
                                (self.num_embeddings, self.features), jnp.int8)
        self.scale = self.param("scale", nn.initializers.ones, (self.num_embeddings,),
                                jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        rows = self.codes[tokens].astype(jnp.float32) * self.scale[tokens][..., None]
        return rows.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits in float32: int8 inputs per token x int8 rows -> int32, then both scales."""
        return matmul.codes_dot(x, self.codes, self.scale, HEAD_INT8.activation, jnp.float32,
                                integer=True)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """cos/sin tables (..., T, head_dim) for the rotate-half convention of transformers' Llama."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


@functools.lru_cache(maxsize=64)
def _static_rope_cos_sin(length: int, head_dim: int, theta: float):
    """rope_cos_sin of positions 0..length-1 as host constants (1, T, head_dim).

    Inside `jit` traced tables are fused into every consumer, so XLA:CPU recomputed cos and sin
    for each element of q and k in every layer, forward and backward (measured: 15% of the op
    time of a ladder-20m bf16 train step). The float32 angles are the traced ones; cos/sin are taken in float64 and
    rounded, which is also closer to torch than XLA's float32 cos (XLA:CPU is off by up to
    3e-5 at angle 300).
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)[None].astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: Optional[jax.Array],
               theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention: x * cos + rotate_half(x) * sin (in float32).

    `positions_BxT=None` means positions 0..T-1 for every row (training and full-sequence
    evaluation); the tables are then constants.
    """
    head_dim = x_BxTxNxH.shape[-1]
    if positions_BxT is None:
        cos, sin = _static_rope_cos_sin(x_BxTxNxH.shape[1], head_dim, float(theta))
    else:
        cos, sin = rope_cos_sin(positions_BxT, head_dim, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


def quantize_kv(x_BxTxKxH: jax.Array, positions_BxT: Optional[jax.Array],
                kv: KVCachePrecision) -> jax.Array:
    """Fake-quantize keys or values as the KV cache stores them (`kv_cache.quantize`), STE
    gradient. `positions_BxT=None` means positions 0..T-1."""
    return quant.fake_quantize(lambda x: kv_cache.quantize(x, positions_BxT, kv), x_BxTxKxH)


def attention_implementation(dtype, head_dim: int) -> Optional[str]:
    """cuDNN's fused (flash) attention on NVIDIA GPUs where it applies, else XLA's.

    XLA's version materialises the (T x T) scores of every head: fine for short CPU sequences,
    but at T = 2048 on a GPU it costs memory and time that the fused kernel does not.
    """
    fused_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
        and head_dim <= 128
    return "cudnn" if fused_ok and jax.default_backend() == "gpu" else None


ATTENTION_BLOCK = 128


def causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                     block: int = ATTENTION_BLOCK, scale: Optional[float] = None) -> jax.Array:
    """Causal (grouped-query) softmax attention with `jax.nn.dot_product_attention`'s arithmetic.

    With cuDNN (GPUs) the fused kernel skips the masked half itself. Elsewhere every score is
    computed, so long sequences go in query blocks that attend only to the keys at or before them:
    the same numbers, a quarter fewer products at 2 blocks (30% less attention time measured on
    a 2-core CPU at 256 tokens). On CPUs each block is `cpu_attention`'s (the same arithmetic,
    products laid out for XLA:CPU's fast path); elsewhere `jax.nn`'s. `scale` multiplies q.k
    (None: 1/sqrt(head_dim)).
    """
    implementation = attention_implementation(q_BxTxNxH.dtype, q_BxTxNxH.shape[-1])
    if implementation is not None:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, scale=scale,
                                            is_causal=True, implementation=implementation)

    def blockwise(attend_block):
        return lambda q, k, v: _blockwise_causal(attend_block, q, k, v, block, scale)

    return jax.lax.platform_dependent(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
        cpu=blockwise(cpu_attention.causal_attention_block), default=blockwise(_xla_causal_block))


def _blockwise_causal(attend_block, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block, scale):
    """Causal attention in query blocks (one block where the length is not a multiple)."""
    length = q_BxTxNxH.shape[1]
    if length <= block or length % block:
        return attend_block(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, 0, scale)
    outputs = [attend_block(q_BxTxNxH[:, start:start + block], k_BxTxKxH[:, :start + block],
                            v_BxTxKxH[:, :start + block], start, scale)
               for start in range(0, length, block)]
    return jnp.concatenate(outputs, axis=1)


def _xla_causal_block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_offset: int, scale):
    """`jax.nn.dot_product_attention` of queries at positions q_offset.. to keys at 0..S-1."""
    if q_offset == 0:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=scale,
                                            is_causal=True)
    visible_QxK = cpu_attention.visible_keys(q_offset, q_BxTxNxH.shape[1], k_BxSxKxH.shape[1])
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=scale,
                                        mask=visible_QxK[None, None])


class _BlockWithLinears(nn.Module):
    """What attention and MLP blocks share: how they build their BitLinear layers and norms.

    Keyword-only, so subclasses can declare required fields of their own.
    """

    _: dataclasses.KW_ONLY
    inner_norm: bool = False
    sub_norm: bool = False
    norm_eps: float = 1e-5
    integer: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.normal(stddev=0.02)
    weights: str = "float"
    int8_backward: bool = False

    def _linear(self, features, precision, axes, name):
        return BitLinear(features, precision, axes, self.inner_norm, self.norm_eps, self.integer,
                         self.dtype, None, self.param_dtype, self.kernel_init, self.weights,
                         self.int8_backward, name=name)


class CausalSelfAttention(_BlockWithLinears):
    """Causal grouped-query attention with RoPE; optional sub-norm before the output projection.

    The four projections are BitLinear layers with the recipe's `qkv` / `attn_out` precisions.
    Given a `cache` (decoding), the new keys/values are written into it from slot `cache_index`,
    the queries attend to every visible slot, and the updated cache is returned with the output.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    qkv_precision: LinearPrecision = LinearPrecision()
    out_precision: LinearPrecision = LinearPrecision()
    kv_cache: Optional[KVCachePrecision] = None
    attention_scale: Optional[float] = None  # softmax scale of q.k; None: 1/sqrt(head_dim)

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: Optional[jax.Array] = None,
                 cache: Optional[kv_cache.LayerCache] = None,
                 cache_index: Optional[jax.Array] = None,
                 cache_start: Optional[jax.Array] = None):
        batch, length, d_model = x_BxTxD.shape
        q = self._linear(self.n_heads * self.head_dim, self.qkv_precision, ("embed", "heads"),
                         "q_proj")(x_BxTxD)
        k = self._linear(self.n_kv_heads * self.head_dim, self.qkv_precision,
                         ("embed", "kv_heads"), "k_proj")(x_BxTxD)
        v = self._linear(self.n_kv_heads * self.head_dim, self.qkv_precision,
                         ("embed", "kv_heads"), "v_proj")(x_BxTxD)
        q_BxTxNxH = q.reshape(batch, length, self.n_heads, self.head_dim)
        k_BxTxKxH = k.reshape(batch, length, self.n_kv_heads, self.head_dim)
        v_BxTxKxH = v.reshape(batch, length, self.n_kv_heads, self.head_dim)
        q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, self.rope_theta)
        k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, self.rope_theta)
        if cache is None:
            if self.kv_cache is not None:  # a4.8: the cache holds low-bit keys/values after RoPE
                k_BxTxKxH = quantize_kv(k_BxTxKxH, positions_BxT, self.kv_cache)
                v_BxTxKxH = quantize_kv(v_BxTxKxH, positions_BxT, self.kv_cache)
            out_BxTxNxH = causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                           scale=self.attention_scale)
        else:
            cache = kv_cache.update_layer(cache, k_BxTxKxH, v_BxTxKxH, cache_index,
                                          positions_BxT, self.kv_cache)
            keys_BxSxKxH, values_BxSxKxH = kv_cache.read_layer(cache, q_BxTxNxH.dtype)
            visible = kv_cache.attention_mask(cache_start, cache_index, length,
                                              keys_BxSxKxH.shape[1])
            out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, keys_BxSxKxH, values_BxSxKxH,
                                                       scale=self.attention_scale, mask=visible)
        out = out_BxTxNxH.reshape(batch, length, self.n_heads * self.head_dim)
        if self.sub_norm:
            out = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, "heads",
                          name="attn_sub_norm")(out)
        out = self._linear(d_model, self.out_precision, ("heads", "embed"), "o_proj")(out)
        return out if cache is None else (out, cache)


def ffn_activation(name: str):
    """The gate non-linearity of a gated MLP: SwiGLU's SiLU or BitNet's squared ReLU."""
    if name == "swiglu":
        return jax.nn.silu
    if name == "relu2":
        return lambda g: jnp.square(jax.nn.relu(g))
    raise ValueError(f"ffn activation must be 'swiglu' or 'relu2', got {name!r}")


def gated_hidden(activation: str, gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """act(gate) * up in float32, rounded once to `dtype`, as RMSNorm here and torch's bf16 SiLU
    compute it. Written in bf16, XLA:CPU rounds after each of SiLU's operations (five roundings)
    and ran it 2.2x slower: 1.46 against 3.24 ms forward, 2.18 against 3.96 ms for the gradient,
    at ladder-6.4m's (16, 256, 704) on a 2-core AMD EPYC (2026-12-06)."""
    return (ffn_activation(activation)(gate.astype(jnp.float32))
            * up.astype(jnp.float32)).astype(dtype)


class GatedMLP(_BlockWithLinears):
    """down(act(gate(x)) * up(x)), optionally with a sub-norm before the down projection."""

    d_ff: int
    activation: str = "swiglu"
    gate_up_precision: LinearPrecision = LinearPrecision()
    down_precision: LinearPrecision = LinearPrecision()

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        gate = self._linear(self.d_ff, self.gate_up_precision, ("embed", "mlp"), "gate_proj")(x_BxTxD)
        up = self._linear(self.d_ff, self.gate_up_precision, ("embed", "mlp"), "up_proj")(x_BxTxD)
        hidden_BxTxF = gated_hidden(self.activation, gate, up, self.dtype)
        if self.sub_norm:
            hidden_BxTxF = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, "mlp",
                                   name="ffn_sub_norm")(hidden_BxTxF)
        return self._linear(x_BxTxD.shape[-1], self.down_precision, ("mlp", "embed"),
                            "down_proj")(hidden_BxTxF)
