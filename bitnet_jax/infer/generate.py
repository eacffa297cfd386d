"""Inference: weights quantized once and stored as integers, and batched KV-cache generation.

Training keeps float weights and quantizes them on every call. For inference,
`inference_params` quantizes each linear weight once into int8 codes (out, in) with a float32
scale ("int8"), or 2-bit codes in the Hugging Face layout unpacked on the fly ("packed"), and
casts everything else to the compute dtype. With `integer=True` the products run as
int8 activations x int8 ternary weights -> int32. All formats give the numbers of the training
model's quantized forward pass (tests/test_inference.py).

`generate` left-pads a batch of prompts, fills the cache with one prefill pass, then decodes one
token per step with a jitted step that donates the cache.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import codec, matmul
from bitnet_jax.core.precision import HEAD_INT8, KVCachePrecision, PrecisionRecipe, get_recipe
from bitnet_jax.errors import require
from bitnet_jax.infer.decode_kernels import decode_products
from bitnet_jax.infer.sampling import SamplingConfig, sample
from bitnet_jax.interop import packed, packed_params
from bitnet_jax.interop.load import load_model
from bitnet_jax.interop.run_dir import ModelBundle
from bitnet_jax.model import layer_stack
from bitnet_jax.model import kv_cache
from bitnet_jax.model.layers import HEAD_FORMATS, WEIGHT_FORMATS
from bitnet_jax.model.linears import PROJECTION_ROLES
from bitnet_jax.model.transformer import ModelConfig, Transformer

# ----------------------------------------------------------------------------------------------
# Weights for inference.

def storable(recipe: PrecisionRecipe, weights: str) -> Optional[str]:
    """Why `recipe` cannot hold its weights as `weights`, or None if it can."""
    require(weights in WEIGHT_FORMATS, f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if weights == "float":
        return None
    if not recipe.quantizes_weights:
        return f"precision {recipe.name!r} does not quantize weights"
    for role, precision in recipe.roles.items():
        quantizer = precision.weight
        if quantizer is None:
            return f"the {role} weights of {recipe.name!r} are not quantized"
        if quantizer.granularity == "group":
            return f"{recipe.name!r} has per-group scales (stored weights support tensor/channel)"
        if quantizer.bits > 8:
            return f"the {role} weights of {recipe.name!r} have more than 8 bits"
        if weights == "packed" and quantizer.kind not in ("ternary", "binary"):
            return f"2-bit packing needs ternary weights; {recipe.name!r} {role} is {quantizer.kind}"
    return None


def default_weights(recipe: PrecisionRecipe) -> str:
    return "int8" if storable(recipe, "int8") is None else "float"


def _stored_linear(node: dict, quantizer, weights: str) -> dict:
    """{kernel (in, out), ...} -> {codes int8 (out, in) | packed uint8, scale, ...}."""
    quantized = matmul.quantize_weight(quantizer, node["kernel"])  # the forward's codes
    codes_OxI = codec.torch_codes(quantized.codes)
    scale = jnp.reshape(quantized.scale, (-1,) if quantizer.granularity == "channel" else ())
    stored = {k: v for k, v in node.items() if k != "kernel"}
    stored["scale"] = scale.astype(jnp.float32)
    if weights == "int8":
        stored["codes"] = codes_OxI
    else:
        stored["packed"] = codec.pack_codes(codes_OxI, "2bit")
    return stored


_STORED_LEAVES = ("codes", "packed", "scale")


def _cast_unstored(node: Any, dtype) -> Any:
    """Every parameter cast to `dtype` (the compute dtype: it is what they are used in), except
    the codes and scales of stored linear layers."""
    if not isinstance(node, dict):
        return jnp.asarray(node, dtype)
    stored = "codes" in node or "packed" in node
    return {k: v if stored and k in _STORED_LEAVES else _cast_unstored(v, dtype)
            for k, v in node.items()}


def inference_params(params: Any, recipe: PrecisionRecipe, weights: str, dtype) -> Any:
    """The float parameter tree of `Transformer(config, recipe)` rearranged for
    `Transformer(config, recipe, weights=weights)`: quantized linear weights stored as codes,
    every other parameter cast to `dtype`."""
    reason = storable(recipe, weights)
    require(reason is None, f"cannot store weights as {weights!r}: {reason}")

    def convert(node: Any, name: str) -> Any:
        if not isinstance(node, dict):
            return node
        role = PROJECTION_ROLES.get(name)
        if weights != "float" and role is not None and "kernel" in node:
            node = _stored_linear(node, recipe.role(role).weight, weights)
        return {k: convert(v, k) for k, v in node.items()}

    return _cast_unstored(convert(dict(params), ""), dtype)


def with_head(params: Any, head: str) -> Any:
    """Inference parameters with the output head held as `head` (see HEAD_FORMATS)."""
    require(head in HEAD_FORMATS, f"head must be one of {HEAD_FORMATS}, got {head!r}")
    return int8_head_params(params) if head == "int8" else params


def int8_head_params(params: Any) -> Any:
    """Inference parameters with the output head held as `core.precision.HEAD_INT8` int8 rows
    (for `Transformer(..., head="int8")`): the tied table becomes `embed_tokens/{codes, scale}`
    (looked up as codes x scale, so the inputs change slightly too), an untied `lm_head` its
    stored-linear `{codes, scale}`. Halves a bf16 head's bytes; the logits move by about 1% of
    their range (tests/test_inference.py)."""
    params = dict(params)
    if "lm_head" in params:
        params["lm_head"] = _stored_linear(params["lm_head"], HEAD_INT8.weight, "int8")
    else:  # the table (vocab, d) is the head's kernel transposed: one scale per vocabulary row
        table_VxD = jnp.asarray(params["embed_tokens"]["embedding"], jnp.float32)
        params["embed_tokens"] = _stored_linear({"kernel": table_VxD.T}, HEAD_INT8.weight, "int8")
    return params


def tree_bytes(tree: Any) -> int:
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Generation.

@dataclass
class Generator:
    """A model ready to generate: inference parameters and the jitted forward step."""

    config: ModelConfig
    recipe: PrecisionRecipe
    params: Any
    weights: str = "float"
    integer: bool = False
    head: str = "float"  # "int8": the output head as int8 rows (`int8_head_params`)
    _step: Callable = field(init=False, repr=False)

    def __post_init__(self):
        model, apply = self.model, self._apply

        def step(params, cache, tokens_BxT):
            logits_BxTxV, cache = apply(model, params, tokens_BxT, cache=cache)
            return logits_BxTxV[:, -1], cache

        self._step = jax.jit(step, donate_argnums=1)

    @property
    def model(self) -> Transformer:
        return Transformer(self.config, self.recipe, self.integer, self.weights, self.head)

    def step(self, cache: kv_cache.KVCache, tokens_BxT: jax.Array):
        """Logits of the last new token (B, V) and the cache with the new tokens in it."""
        return self._step(self.params, cache, tokens_BxT)

    def full_logits(self, tokens_BxT: jax.Array) -> jax.Array:
        """Logits (B, T, V) of whole sequences, no cache (the reference for decoding)."""
        return self._apply(self.model, self.params, tokens_BxT)

    def _apply(self, model: Transformer, params: Any, *args, **kwargs):
        # Products that read packed or bf16 weights in place (infer.decode_kernels).
        with decode_products():
            return model.apply({"params": params}, *args, **kwargs)


def _generator_settings(config: ModelConfig, recipe: PrecisionRecipe, weights: str,
                        integer: Optional[bool], kv_bits: Optional[int], dtype: Optional[str]):
    """The config, recipe, weight format and integer flag a Generator runs with."""
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if kv_bits is not None:
        require(2 <= kv_bits <= 8, f"kv_bits must be between 2 and 8, got {kv_bits}")
        recipe = dataclasses.replace(recipe, kv_cache=KVCachePrecision(kv_bits))
    weights = default_weights(recipe) if weights == "auto" else weights
    if integer is None:
        integer = weights != "float" and recipe.supports_integer_matmul
    require(not integer or recipe.supports_integer_matmul,
            f"precision {recipe.name!r} cannot run integer products (needs <= 8-bit weights and "
            f"activations in every linear role)")
    return config.replace(param_dtype=config.dtype), recipe, weights, integer


def make_generator(params: Any, config: ModelConfig, recipe: PrecisionRecipe,
                   weights: str = "auto", integer: Optional[bool] = None,
                   kv_bits: Optional[int] = None, dtype: Optional[str] = None,
                   head: str = "float") -> Generator:
    """A Generator from float parameters. "auto" weights: int8 codes where the recipe allows;
    `integer` defaults to the int8 product wherever the recipe supports it; `kv_bits`
    quantizes the KV cache (BitNet a4.8 uses 3); `dtype` overrides the compute dtype;
    `head="int8"` holds the output head as int8 rows (`int8_head_params`)."""
    # The KV-cache decoder runs block by block: the unrolled layout (scan/remat are for training).
    params = layer_stack.unstack_layers(params)
    config = config.replace(scan_layers=False, remat="none")
    config, recipe, weights, integer = _generator_settings(config, recipe, weights, integer,
                                                           kv_bits, dtype)
    stored = with_head(inference_params(params, recipe, weights, jnp.dtype(config.dtype)), head)
    return Generator(config, recipe, stored, weights, integer, head)


def load_generator(directory: str | Path, weights: str = "auto", integer: Optional[bool] = None,
                   kv_bits: Optional[int] = None, dtype: Optional[str] = None,
                   head: str = "float") -> tuple[ModelBundle, Generator]:
    """The model in `directory` (see `interop.load.load_model`) and a Generator for it, with the
    options of `make_generator`.

    A packed checkpoint decoded from stored (int8 or packed) weights is read straight into
    them: no float kernels are rebuilt only to be quantized again. The returned bundle then
    has `params=None`.
    """
    path = Path(directory).expanduser()
    if (path / packed.MANIFEST_FILE).is_file():
        recipe = get_recipe(packed.read_manifest(path)["precision"])
        stored_format = default_weights(recipe) if weights == "auto" else weights
        if stored_format != "float" and storable(recipe, stored_format) is None:
            bundle, stored = packed_params.load_inference_params(path, stored_format)
            config, recipe, stored_format, integer = _generator_settings(
                bundle.config, bundle.recipe, stored_format, integer, kv_bits, dtype)
            stored = with_head(_cast_unstored(stored, jnp.dtype(config.dtype)), head)
            return bundle, Generator(config, recipe, stored, stored_format, integer, head)
    bundle = load_model(path)
    return bundle, make_generator(bundle.params, bundle.config, bundle.recipe, weights,
                                  integer, kv_bits, dtype, head)


@dataclass
class Generation:
    tokens: list  # new token ids per prompt (np.int32 arrays), stopping at (and keeping) stop_id
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        rows = len(self.tokens)
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def left_pad(prompts: Sequence[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (B, P) right-aligned with 0s before them, and each row's first real slot.
    Rows past len(prompts) repeat the last prompt."""
    prompts = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    length = max(len(p) for p in prompts)
    tokens = np.zeros((rows, length), np.int32)
    start = np.zeros((rows,), np.int32)
    for row, prompt in enumerate(prompts):
        start[row] = length - len(prompt)
        tokens[row, start[row]:] = prompt
    return tokens, start


def batch_rows(n_prompts: int) -> int:
    """Rows to decode: XLA:CPU runs matrix-vector products ~10x slower than 2-row products (its
    vector path is not the tuned GEMM), so a single prompt is decoded alongside a copy."""
    return max(n_prompts, 2) if jax.default_backend() == "cpu" else n_prompts


def generate(generator: Generator, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_id: Optional[int] = None,
             on_step: Optional[Callable[[int], None]] = None) -> Generation:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens."""
    require(len(prompts) > 0, "generate needs at least one prompt")
    require(all(len(p) > 0 for p in prompts), "every prompt needs at least one token")
    require(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [np.asarray(p, np.int32) for p in prompts]
    cfg = generator.config
    tokens_BxP, start_B = left_pad(prompts, batch_rows(len(prompts)))
    total = tokens_BxP.shape[1] + max_new_tokens
    require(total <= cfg.max_seq_len,
            f"prompt ({tokens_BxP.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's max_seq_len={cfg.max_seq_len}")
    cache = kv_cache.init_cache(cfg.n_layers, tokens_BxP.shape[0], total, cfg.n_kv_heads,
                                cfg.head_dim, jnp.dtype(cfg.dtype), generator.recipe.kv_cache,
                                start_B)
    rng = jax.random.PRNGKey(seed)

    began = time.perf_counter()
    logits_BxV, cache = generator.step(cache, jnp.asarray(tokens_BxP))
    logits_BxV.block_until_ready()
    prefill_seconds = time.perf_counter() - began

    new_tokens, done = [], np.zeros(tokens_BxP.shape[0], bool)
    began = time.perf_counter()
    for step in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        next_B = np.asarray(_sample(logits_BxV, key, sampling))
        new_tokens.append(next_B)
        if stop_id is not None:
            done |= next_B == stop_id
        if on_step is not None:
            on_step(step)
        if step == max_new_tokens - 1 or done[:len(prompts)].all():
            break
        logits_BxV, cache = generator.step(cache, jnp.asarray(next_B[:, None]))
    decode_seconds = time.perf_counter() - began

    generated = np.stack(new_tokens, axis=1)[:len(prompts)]
    return Generation([_until_stop(row, stop_id) for row in generated], prefill_seconds,
                      decode_seconds, len(new_tokens))


_sample = jax.jit(sample, static_argnames="config")


def _until_stop(row: np.ndarray, stop_id: Optional[int]) -> np.ndarray:
    if stop_id is None or stop_id not in row:
        return row
    return row[:int(np.argmax(row == stop_id)) + 1]


def generate_without_cache(generator: Generator, prompt: Sequence[int], max_new_tokens: int,
                           sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> np.ndarray:
    """Reference decoding of one prompt: re-run the whole sequence for every new token.

    The sequence is right-padded to its final length so that one compiled forward serves every
    step (the model is causal: padding after a position does not change its logits).
    """
    length = len(prompt) + max_new_tokens
    tokens = np.zeros((batch_rows(1), length), np.int32)
    tokens[:, :len(prompt)] = prompt
    rng = jax.random.PRNGKey(seed)
    forward = jax.jit(generator.full_logits)
    for position in range(len(prompt), length):
        rng, key = jax.random.split(rng)
        logits_BxV = forward(jnp.asarray(tokens))[:, position - 1]
        tokens[:, position] = int(np.asarray(sample(logits_BxV, key, sampling))[0])
    return tokens[0, len(prompt):]
