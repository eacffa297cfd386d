import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.infer import generate as inference
from bitnet_jax.model import kv_cache
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.infer.sampling import SamplingConfig

CONFIG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                     max_seq_len=48, dtype="float32")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [33]]


def float_params(precision: str, config: ModelConfig = CONFIG):
    return nn.unbox(init_params(config, get_recipe(precision), jax.random.PRNGKey(0)))


def tokens(batch=2, length=12, vocab=64):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)


@pytest.mark.parametrize("precision,weights,integer", [
    ("b1.58", "int8", True), ("b1.58", "int8", False), ("b1.58", "packed", True),
    ("b1.58@channel", "int8", True), ("b1.58@channel", "packed", True),
    ("a4.8", "packed", True), ("w4a8", "int8", True), ("b1", "packed", True),
    ("bf16", "float", False),
])
def test_stored_weights_give_the_training_forward(precision, weights, integer):
    recipe = get_recipe(precision)
    params = float_params(precision)
    reference = Transformer(CONFIG, recipe).apply({"params": params}, tokens())
    generator = inference.make_generator(params, CONFIG, recipe, weights, integer)
    np.testing.assert_allclose(generator.full_logits(tokens()), reference, atol=2e-5, rtol=1e-5)


def test_stored_weights_take_less_memory():
    config = CONFIG.replace(dtype="bfloat16")
    params = float_params("b1.58", config)
    kernels = [leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if "proj" in jax.tree_util.keystr(path)]
    assert len(kernels) == 7 * config.n_layers
    bf16_bytes, scale_bytes = 2 * sum(kernels), 4 * len(kernels)
    size = {w: inference.tree_bytes(inference.make_generator(params, config, get_recipe("b1.58"),
                                                             w).params)
            for w in ("float", "int8", "packed")}
    assert size["float"] - size["int8"] == bf16_bytes // 2 - scale_bytes
    assert size["float"] - size["packed"] == bf16_bytes * 7 // 8 - scale_bytes


# Not a4.8: its 4-bit top-k activations turn the ulp differences between a padded batch's
# forward and one prompt's into different codes (seen on the kernel-quantized weights of
# 2026-12-05: 0.026 on one prompt's logits, 1e-7 on the others);
# `test_stored_weights_give_the_training_forward` covers its stored weights.
@pytest.mark.parametrize("precision,kv_bits", [("bf16", None), ("b1.58", None), ("b1.58", 4)])
def test_prefill_with_left_padding_gives_the_logits_of_each_prompt(precision, kv_bits):
    generator = inference.make_generator(float_params(precision), CONFIG, get_recipe(precision),
                                         kv_bits=kv_bits)
    padded, start = inference.left_pad([np.asarray(p) for p in PROMPTS], len(PROMPTS))
    cache = kv_cache.init_cache(CONFIG.n_layers, len(PROMPTS), padded.shape[1] + 1,
                                CONFIG.n_kv_heads, CONFIG.head_dim, jnp.float32,
                                generator.recipe.kv_cache, start)
    last_logits, cache = generator.step(cache, jnp.asarray(padded))
    next_tokens = jnp.argmax(last_logits, axis=-1)
    step_logits, _ = generator.step(cache, next_tokens[:, None])
    for row, prompt in enumerate(PROMPTS):
        full = generator.full_logits(jnp.asarray([prompt + [int(next_tokens[row])]]))
        np.testing.assert_allclose(last_logits[row], full[0, -2], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(step_logits[row], full[0, -1], atol=1e-4, rtol=1e-4)


# a4.8 is left out here as above: its 4-bit top-k activations turn the ulp differences
# between a jitted and an eager forward into different codes, and a random model's near-tied
# logits into different tokens (seen: a top-2 gap of 0.004 after six tokens).
@pytest.mark.parametrize("precision,weights,kv_bits", [
    ("bf16", "float", None), ("b1.58", "int8", None), ("b1.58", "packed", 3),
])
@pytest.mark.parametrize("sampling", [SamplingConfig(),
                                      SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)])
def test_cached_generation_equals_rerunning_the_full_sequence(precision, weights, kv_bits,
                                                              sampling):
    params = float_params(precision)
    generator = inference.make_generator(params, CONFIG, get_recipe(precision), weights,
                                         kv_bits=kv_bits)
    if sampling.greedy:
        generated = inference.generate(generator, PROMPTS, 12, sampling).tokens
        for prompt, row in zip(PROMPTS, generated):
            reference = inference.generate_without_cache(generator, prompt, 12, sampling)
            np.testing.assert_array_equal(row, reference)
    else:  # the same random stream needs the same batch: one prompt at a time
        for seed, prompt in enumerate(PROMPTS):
            row = inference.generate(generator, [prompt], 12, sampling, seed=seed).tokens[0]
            reference = inference.generate_without_cache(generator, prompt, 12, sampling, seed)
            np.testing.assert_array_equal(row, reference)


def test_generation_stops_at_the_stop_token():
    generator = inference.make_generator(float_params("bf16"), CONFIG, get_recipe("bf16"))
    free = inference.generate(generator, PROMPTS, 10).tokens
    stop_id = int(free[0][2])
    stopped = inference.generate(generator, PROMPTS, 10, stop_id=stop_id).tokens
    first = int(np.argmax(free[0] == stop_id))
    np.testing.assert_array_equal(stopped[0], free[0][:first + 1])


def test_one_prompt_gives_one_row():
    generator = inference.make_generator(float_params("bf16"), CONFIG, get_recipe("bf16"))
    result = inference.generate(generator, [[1, 2, 3]], 4)
    assert len(result.tokens) == 1 and result.tokens[0].shape == (4,)
    assert result.decode_steps == 4 and result.decode_tokens_per_second > 0


def test_errors_name_the_problem():
    params = float_params("bf16")
    with pytest.raises(ConfigError, match="does not quantize weights"):
        inference.make_generator(params, CONFIG, get_recipe("bf16"), "int8")
    with pytest.raises(ConfigError, match="integer products"):
        inference.make_generator(params, CONFIG, get_recipe("bf16"), integer=True)
    with pytest.raises(ConfigError, match="2-bit packing needs ternary"):
        inference.make_generator(float_params("w4a8"), CONFIG, get_recipe("w4a8"), "packed")
    generator = inference.make_generator(params, CONFIG, get_recipe("bf16"))
    with pytest.raises(ConfigError, match="max_seq_len"):
        inference.generate(generator, [[1] * 40], 10)
    with pytest.raises(ConfigError, match="at least one token"):
        inference.generate(generator, [[]], 10)


# ----------------------------------------------------------------------------------------------
# The int8 output head (inference only).

def test_int8_embedding_is_the_int8_product_of_its_rows():
    """Lookup = codes x scale; attend = round(x / s_x) . codes^T x s_x x s_row, as numpy
    computes it in float64 from the same codes (integer sums are exact)."""
    from bitnet_jax.model.layers import Int8Embedding

    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (50, 32)).astype(np.int8)
    scale = rng.uniform(0.001, 0.01, 50).astype(np.float32)
    x = rng.normal(size=(2, 5, 32)).astype(np.float32)
    variables = {"params": {"codes": jnp.asarray(codes), "scale": jnp.asarray(scale)}}
    module = Int8Embedding(50, 32, jnp.float32)
    rows = module.apply(variables, jnp.asarray([[3, 7]]))
    np.testing.assert_allclose(rows[0], codes[[3, 7]] * scale[[3, 7], None], rtol=1e-6)
    logits = module.apply(variables, jnp.asarray(x), method="attend")
    absmax = np.abs(x).max(-1, keepdims=True)
    x_codes = np.clip(np.round(x * (np.float32(1) / absmax * 127)), -128, 127)
    expected = (x_codes.astype(np.float64) @ codes.T.astype(np.float64)) * (absmax / 127) * scale
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision,tied", [("b1.58", True), ("b1.58", False), ("bf16", True)])
def test_int8_head_moves_logits_by_about_one_percent(precision, tied):
    """Against the float head: every logit within 2% of the largest logit, the same argmax at
    nearly every position, and cached generation still equal to the full-sequence reference."""
    config = CONFIG.replace(tie_embeddings=tied)
    params = float_params(precision, config)
    recipe = get_recipe(precision)
    float_head = inference.make_generator(params, config, recipe)
    int8_head = inference.make_generator(params, config, recipe, head="int8")
    head_leaves = int8_head.params["embed_tokens" if tied else "lm_head"]
    assert head_leaves["codes"].dtype == jnp.int8 and head_leaves["codes"].shape == (64, 64)
    reference = np.asarray(float_head.full_logits(tokens()))
    logits = np.asarray(int8_head.full_logits(tokens()))
    assert np.abs(logits - reference).max() <= 0.02 * np.abs(reference).max()
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    generated = inference.generate(int8_head, PROMPTS[:1], 8).tokens[0]
    np.testing.assert_array_equal(
        generated, inference.generate_without_cache(int8_head, PROMPTS[0], 8))


def test_int8_head_halves_a_bf16_heads_bytes():
    config = CONFIG.replace(dtype="bfloat16", tie_embeddings=True)
    params = float_params("b1.58", config)
    size = {head: inference.tree_bytes(inference.make_generator(
        params, config, get_recipe("b1.58"), head=head).params) for head in ("float", "int8")}
    vocab, width = config.vocab_size, config.d_model
    assert size["float"] - size["int8"] == vocab * width * (2 - 1) - vocab * 4
    with pytest.raises(ConfigError, match="head must be one of"):
        inference.make_generator(params, config, get_recipe("b1.58"), head="int4")
