"""ModelConfig, size presets and the decoder-only Transformer LM.

One model serves every precision: `Transformer(config, recipe)` with the same config gives the
same parameter tree for `bf16` and `b1.58`; only the arithmetic inside BitLinear changes.

Norm placements (`norm_placement`):
- `pre`: LLaMA, RMSNorm before attention and before the MLP.
- `subln`: BitNet b1.58 2B4T, `pre` plus `attn_sub_norm` before o_proj and `ffn_sub_norm`
  before down_proj (the layout of transformers' BitNetForCausalLM).
- `bitlinear`: BitNet b1.58 training tips, an RMSNorm inside every BitLinear and no block norms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitnet_jax.errors import ConfigError, require
from bitnet_jax.model import layer_stack, mup
from bitnet_jax.model.kv_cache import KVCache, LayerCache
from bitnet_jax.model.linears import DECODER_LINEARS
from bitnet_jax.model.layers import (HEAD_FORMATS, BitLinear, CausalSelfAttention, GatedMLP,
                                     Int8Embedding, RMSNorm, logical_init)
from bitnet_jax.core.precision import HEAD_INT8, LinearPrecision, PrecisionRecipe, get_recipe

NORM_PLACEMENTS = ("pre", "subln", "bitlinear")
# jax.checkpoint policies under MaxText's names: what a block saves for the backward pass
# (everything else is recomputed). "minimal" keeps the weight matmuls' outputs (dots without a
# batch dimension), "dots" every matmul including attention's, "full" only the block's input.
REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}
FFN_ACTIVATIONS = ("swiglu", "relu2")
DTYPES = ("bfloat16", "float32", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a decoder-only LM. Invalid combinations fail at construction."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: Optional[int] = None  # default: n_heads (multi-head attention)
    d_ff: Optional[int] = None  # default: 8/3 d_model rounded up to a multiple of 32
    head_dim: Optional[int] = None  # default: d_model // n_heads
    max_seq_len: int = 2048
    ffn_activation: str = "swiglu"
    norm_placement: str = "subln"
    tie_embeddings: bool = False
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    parametrization: str = "standard"  # standard | mup (see bitnet_jax.model.mup)
    mup_base_d_model: Optional[int] = None  # muP base width; default: this config's d_model
    mup_base_head_dim: Optional[int] = None  # muP base head size; default: this head_dim
    # How the blocks are computed (not their shape; the parameter layout: model.layer_stack).
    scan_layers: bool = False  # one nn.scan over blocks stacked on a `layers` axis
    remat: str = "none"  # none | minimal | dots | full: what a block keeps for the backward

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0,
                    f"model.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", -(-8 * self.d_model // 3 // 32) * 32)
        if self.head_dim is None:
            require(self.d_model % self.n_heads == 0,
                    f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                    f"pick a divisor of d_model or set model.head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("n_kv_heads", "d_ff", "head_dim"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0,
                    f"model.{name} must be a positive integer, got {value!r}")
        require(self.n_heads % self.n_kv_heads == 0,
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                f"(grouped-query attention shares each KV head among a whole number of heads)")
        require(self.head_dim % 2 == 0,
                f"model.head_dim={self.head_dim} must be even for rotary embeddings (RoPE rotates "
                f"pairs of features)")
        require(self.ffn_activation in FFN_ACTIVATIONS,
                f"model.ffn_activation={self.ffn_activation!r}; choose one of {FFN_ACTIVATIONS}")
        require(self.norm_placement in NORM_PLACEMENTS,
                f"model.norm_placement={self.norm_placement!r}; choose one of {NORM_PLACEMENTS}")
        for name in ("dtype", "param_dtype"):
            require(getattr(self, name) in DTYPES,
                    f"model.{name}={getattr(self, name)!r}; choose one of {DTYPES}")
        require(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}")
        require(self.init_std > 0, f"model.init_std must be positive, got {self.init_std}")
        require(isinstance(self.scan_layers, bool),
                f"model.scan_layers must be true or false, got {self.scan_layers!r}")
        require(self.remat in REMAT_POLICIES,
                f"model.remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}")
        self._resolve_mup()

    def _resolve_mup(self) -> None:
        """Check the muP fields; the bases default to this config's own sizes, so a preset
        widened by an override keeps the preset as its base."""
        require(self.parametrization in mup.PARAMETRIZATIONS,
                f"model.parametrization={self.parametrization!r}; choose one of "
                f"{mup.PARAMETRIZATIONS}")
        for name, own in (("mup_base_d_model", self.d_model), ("mup_base_head_dim", self.head_dim)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, own)
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"model.{name} must be a positive integer (the width the hyperparameters "
                    f"were tuned at) or null for this model's own, got {value!r}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class Transformer(nn.Module):
    """Decoder-only LM: embeddings -> blocks -> final RMSNorm -> logits (float32).

    `recipe` says how each linear role is quantized; embeddings and the head stay full precision.
    `integer=True` runs quantized matmuls on the int8 path (needs a recipe that supports it);
    `int8_backward=True` also takes their input gradients as int8 products (not exact; see
    `matmul.quantized_dot`).
    `weights` is how quantized linear layers hold their weights: "float" (training) or, for
    inference, "int8" / "packed" codes (see `bitnet_jax.infer.generate.inference_params`).
    `head="int8"` holds the output head (the tied table, or lm_head) as int8 rows for
    inference (`core.precision.HEAD_INT8`; a lossy choice, off by default).

    Called with a `kv_cache.KVCache`, the model decodes: it returns (logits, updated cache).
    """

    config: ModelConfig
    recipe: PrecisionRecipe = get_recipe("bf16")
    integer: bool = False
    weights: str = "float"
    head: str = "float"
    int8_backward: bool = False

    def setup(self):
        cfg, recipe = self.config, self.recipe
        require(self.head in HEAD_FORMATS, f"head must be one of {HEAD_FORMATS}, got {self.head!r}")
        int8_head = self.head == "int8"
        if self.integer and not recipe.supports_integer_matmul:
            raise ConfigError(f"precision {recipe.name!r} has a linear role that is not integer "
                              f"(weights and activations at most 8 bits); set integer=False")
        if self.int8_backward and not self.integer:
            raise ConfigError("int8_backward=True needs the integer path (integer=True)")
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embedding_std = cfg.init_std * mup.role_scale(cfg, "embedding").init
        if int8_head and cfg.tie_embeddings:
            self.embed_tokens = Int8Embedding(cfg.vocab_size, cfg.d_model, dtype)
        else:
            self.embed_tokens = nn.Embed(
                cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                embedding_init=logical_init(nn.initializers.normal(stddev=embedding_std),
                                            ("vocab", "embed")))
        block = DecoderBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)  # scan already prevents CSE
        if cfg.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0},
                                  split_rngs={"params": True}, in_axes=(nn.broadcast,),
                                  length=cfg.n_layers,
                                  metadata_params={nn.PARTITION_NAME: layer_stack.SCANNED})(
                cfg, recipe, self.integer, self.weights, self.int8_backward, scanned=True,
                name=layer_stack.SCANNED)
        else:
            self.layers = [block(cfg, recipe, self.integer, self.weights, self.int8_backward,
                                 name=f"layers_{i}")
                           for i in range(cfg.n_layers)]
        self.norm = RMSNorm(cfg.norm_eps, dtype, param_dtype, "embed")
        if not cfg.tie_embeddings:
            self.lm_head = BitLinear(cfg.vocab_size, HEAD_INT8 if int8_head else LinearPrecision(),
                                     ("embed", "vocab"), integer=int8_head,
                                     dtype=dtype, out_dtype=jnp.float32, param_dtype=param_dtype,
                                     kernel_init=nn.initializers.normal(
                                         stddev=cfg.init_std * mup.role_scale(cfg, "output").init),
                                     weights="int8" if int8_head else "float")

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: Optional[jax.Array] = None,
                 cache: Optional[KVCache] = None):
        """Logits (B, T, vocab) in float32 for integer tokens (B, T); with a cache, also the
        updated cache (positions then come from the cache)."""
        return self.logits_from_embeddings(self.embed(tokens_BxT), positions_BxT, cache)

    def embed(self, tokens_BxT: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens_BxT)

    def logits_from_embeddings(self, x_BxTxD: jax.Array,
                               positions_BxT: Optional[jax.Array] = None,
                               cache: Optional[KVCache] = None):
        length = x_BxTxD.shape[1]
        if cache is not None:
            positions_BxT = cache.positions(length)
        # Otherwise None stands for 0..T-1 in every row: the layers then use constant RoPE tables.
        # Constraints on the residual stream and logits (no-ops without sharding rules in scope).
        # Activations have names of their own: FSDP shards a parameter's `embed` axis, while the
        # residual stream is split over the batch and kept whole along its features.
        residual_axes = RESIDUAL_AXES
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, residual_axes)
        if self.config.scan_layers:
            if cache is not None:
                raise ConfigError("decoding with a KV cache wants the unrolled layout: convert "
                                  "with model.layer_stack.unstack_layers(params) and "
                                  "config.replace(scan_layers=False)")
            return self._head(self.layers(x_BxTxD, positions_BxT)[0])
        new_layer_caches = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x_BxTxD = layer(x_BxTxD, positions_BxT)
            else:
                x_BxTxD, layer_cache = layer(x_BxTxD, positions_BxT, cache.layers[i],
                                             cache.index, cache.start)
                new_layer_caches.append(layer_cache)
            x_BxTxD = nn.with_logical_constraint(x_BxTxD, residual_axes)
        logits = self._head(x_BxTxD)
        if cache is None:
            return logits
        return logits, cache.advance(tuple(new_layer_caches), length)

    def _head(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = self.norm(x_BxTxD)
        if self.config.tie_embeddings and self.head == "int8":
            logits = self.embed_tokens.attend(x_BxTxD)
        elif self.config.tie_embeddings:
            table_VxD = self.embed_tokens.embedding.astype(x_BxTxD.dtype)
            logits = jnp.einsum("btd,vd->btv", x_BxTxD, table_VxD,
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x_BxTxD)
        if self.config.parametrization == "mup":  # TP-V's output multiplier (1 at base width)
            logits = logits * mup.output_multiplier(self.config)
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))


RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class DecoderBlock(nn.Module):
    config: ModelConfig
    recipe: PrecisionRecipe
    integer: bool = False
    weights: str = "float"
    int8_backward: bool = False
    scanned: bool = False  # the body of nn.scan: returns (residual, None), the scan's carry

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: Optional[jax.Array] = None,
                 cache: Optional[LayerCache] = None, cache_index: Optional[jax.Array] = None,
                 cache_start: Optional[jax.Array] = None):
        cfg, recipe = self.config, self.recipe
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        block_norms = cfg.norm_placement in ("pre", "subln")
        common = dict(inner_norm=cfg.norm_placement == "bitlinear",
                      sub_norm=cfg.norm_placement == "subln", norm_eps=cfg.norm_eps,
                      integer=self.integer, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nn.initializers.normal(
                          stddev=cfg.init_std * mup.role_scale(cfg, "hidden").init),
                      weights=self.weights, int8_backward=self.int8_backward)

        h = x_BxTxD
        if block_norms:
            h = RMSNorm(cfg.norm_eps, dtype, param_dtype, "embed", name="input_layernorm")(h)
        attention = CausalSelfAttention(
            cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, recipe.qkv,
            recipe.attn_out, recipe.kv_cache, mup.attention_scale(cfg), name="self_attn",
            **common)
        if cache is None:
            x_BxTxD = x_BxTxD + attention(h, positions_BxT)
        else:
            attended, cache = attention(h, positions_BxT, cache, cache_index, cache_start)
            x_BxTxD = x_BxTxD + attended

        h = x_BxTxD
        if block_norms:
            h = RMSNorm(cfg.norm_eps, dtype, param_dtype, "embed",
                        name="post_attention_layernorm")(h)
        x_BxTxD = x_BxTxD + GatedMLP(cfg.d_ff, cfg.ffn_activation, recipe.gate_up, recipe.down,
                                     name="mlp", **common)(h)
        if self.scanned:
            return nn.with_logical_constraint(x_BxTxD, RESIDUAL_AXES), None
        return x_BxTxD if cache is None else (x_BxTxD, cache)


# ----------------------------------------------------------------------------------------------
# Presets.

def _ladder(d_model, n_layers, head_dim, d_ff) -> ModelConfig:
    """CPU sweep ladder: byte-level vocabulary (256 bytes + specials, padded to 320), 2B4T layout."""
    return ModelConfig(vocab_size=320, d_model=d_model, n_layers=n_layers,
                       n_heads=d_model // head_dim, d_ff=d_ff, max_seq_len=256)


def _b158_paper(d_model, d_ff, n_heads, n_layers) -> ModelConfig:
    """BitNet b1.58 paper shapes (FAQ Table 1), LLaMA tokenizer, BitLinear with inner RMSNorm."""
    return ModelConfig(vocab_size=32000, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       d_ff=d_ff, max_seq_len=2048, norm_placement="bitlinear")


def _spectra(d_model, n_layers, d_ff) -> ModelConfig:
    """Spectra (TriLM/FloatLM) shapes. Heads of 64 and d_ff chosen to match the published counts
    with the GPT-NeoX-20B vocabulary (50277) and untied embeddings."""
    return ModelConfig(vocab_size=50277, d_model=d_model, n_layers=n_layers,
                       n_heads=d_model // 64, d_ff=d_ff, max_seq_len=2048, norm_placement="pre")


PRESETS: dict[str, ModelConfig] = {
    # CPU ladder, named by approximate non-embedding parameters (roughly doubling).
    "ladder-12k": _ladder(32, 1, 32, 96),
    "ladder-25k": _ladder(48, 1, 24, 128),
    "ladder-50k": _ladder(64, 1, 32, 160),
    "ladder-100k": _ladder(64, 2, 32, 160),
    "ladder-200k": _ladder(96, 2, 32, 256),
    "ladder-400k": _ladder(128, 2, 32, 352),
    "ladder-800k": _ladder(128, 4, 32, 352),
    "ladder-1.6m": _ladder(160, 5, 32, 448),
    "ladder-3.2m": _ladder(256, 4, 64, 704),
    "ladder-6.4m": _ladder(256, 8, 64, 704),
    "ladder-12m": _ladder(320, 10, 64, 864),
    "ladder-20m": _ladder(512, 6, 64, 1376),
    # BitNet b1.58 paper (hidden / GLU / heads / layers).
    "b1.58-700m": _b158_paper(1536, 4096, 24, 24),
    "b1.58-1.3b": _b158_paper(2048, 5460, 32, 24),
    "b1.58-3b": _b158_paper(3200, 8640, 32, 26),
    "b1.58-3.9b": _b158_paper(3200, 12800, 32, 26),
    # Spectra ladder (hidden / layers as published).
    "spectra-99m": _spectra(512, 16, 1280),
    "spectra-190m": _spectra(768, 16, 2048),
    "spectra-390m": _spectra(1024, 24, 2560),
    "spectra-560m": _spectra(1280, 24, 3072),
    "spectra-830m": _spectra(1536, 24, 4096),
    "spectra-1.1b": _spectra(1792, 24, 5120),
    "spectra-1.5b": _spectra(2048, 24, 6144),
    "spectra-2.4b": _spectra(2304, 30, 7680),
    "spectra-3.9b": _spectra(3072, 30, 9216),
    # The released BitNet b1.58 2B4T shape (microsoft/bitnet-b1.58-2B-4T).
    "bitnet-2b4t": ModelConfig(vocab_size=128256, d_model=2560, n_layers=30, n_heads=20,
                               n_kv_heads=5, d_ff=6912, max_seq_len=4096, ffn_activation="relu2",
                               norm_placement="subln", tie_embeddings=True, rope_theta=500_000.0),
}


def get_model_config(name: Optional[str], **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (e.g. `vocab_size=...`).

    With `name=None` the overrides are the whole config (they must give the required fields).
    """
    if name is None:
        required = [f.name for f in dataclasses.fields(ModelConfig)
                    if f.default is dataclasses.MISSING]
        missing = [field for field in required if field not in overrides]
        require(not missing, f"model.preset is null, so model.overrides must give {required}; "
                             f"missing {missing}")
    elif name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; valid: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(unknown)}; fields are "
                          f"{[f.name for f in dataclasses.fields(ModelConfig)]}")
    if name is None:
        return ModelConfig(**overrides)
    return PRESETS[name].replace(**overrides)


def validate_recipe_for_model(config: ModelConfig, recipe: PrecisionRecipe) -> None:
    """Fail early where a recipe cannot run on a shape (e.g. group sizes that do not divide)."""
    inputs = {linear.role: linear.shape(config)[0] for linear in DECODER_LINEARS}
    for role, n_in in inputs.items():
        weight = recipe.role(role).weight
        if weight is not None and weight.granularity == "group":
            require(n_in % weight.group_size == 0,
                    f"precision {recipe.name!r}: group size {weight.group_size} does not divide "
                    f"the {n_in} input features of the {role} projections; pick a divisor")


def init_params(config: ModelConfig, recipe: PrecisionRecipe, rng: jax.Array,
                seq_len: int = 8):
    """Boxed (logically partitioned) parameters of `Transformer(config, recipe)`."""
    validate_recipe_for_model(config, recipe)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Transformer(config, recipe).init(rng, tokens)["params"]
