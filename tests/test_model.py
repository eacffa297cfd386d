"""The Transformer LM: shapes, causality, one parameter tree for all precisions, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import (NORM_PLACEMENTS, PRESETS, ModelConfig, Transformer,
                              get_model_config, init_params, validate_recipe_for_model)
from bitnet_jax.core.precision import LINEAR_ROLES, get_recipe
from bitnet_jax.model.linears import DECODER_LINEARS, decoder_linear, kernel_path

RNG = jax.random.PRNGKey(0)
RECIPES = ["bf16", "b1", "b1.58", "a4.8", "v2-a8", "v2-a4"]


def small_config(**changes):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                max_seq_len=16, dtype="float32")
    return ModelConfig(**{**base, **changes})


def tokens(batch=2, length=8, vocab=64, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab)


@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_shapes_and_finite(recipe):
    config = small_config(ffn_activation="relu2" if recipe == "a4.8" else "swiglu")
    params = init_params(config, get_recipe(recipe), RNG)
    logits = jax.jit(Transformer(config, get_recipe(recipe)).apply)({"params": params}, tokens())
    assert logits.shape == (2, 8, 64) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("recipe", ["bf16", "b1.58", "a4.8", "v2-a4"])
@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
def test_causality_by_gradient(recipe, placement):
    """d loss_t / d embedding_s is exactly zero for every later position s > t."""
    config = small_config(norm_placement=placement)
    model = Transformer(config, get_recipe(recipe))
    params = init_params(config, get_recipe(recipe), RNG)
    toks = tokens(batch=1, length=8)
    embeddings = model.apply({"params": params}, toks, method=Transformer.embed)
    t = 4

    def loss_at_t(x):
        logits = model.apply({"params": params}, x, method=Transformer.logits_from_embeddings)
        return jax.nn.logsumexp(logits[0, t]) - logits[0, t, 3]

    grad = np.asarray(jax.grad(loss_at_t)(embeddings))
    assert np.all(grad[0, t + 1:] == 0.0)
    assert np.any(grad[0, : t + 1] != 0.0)


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
@pytest.mark.parametrize("tie", [False, True])
def test_all_precisions_share_one_parameter_tree(placement, tie):
    config = small_config(norm_placement=placement, tie_embeddings=tie)
    trees = {r: jax.eval_shape(lambda: init_params(config, get_recipe(r), RNG)) for r in RECIPES}
    reference = jax.tree.map(lambda a: (a.shape, a.dtype), trees["bf16"])
    for recipe, tree in trees.items():
        assert jax.tree.map(lambda a: (a.shape, a.dtype), tree) == reference, recipe
    assert ("lm_head" in trees["bf16"]) == (not tie)


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
def test_every_parameter_has_logical_axis_names(placement):
    params = init_params(small_config(norm_placement=placement), get_recipe("b1.58"), RNG)
    leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned)
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names)
        assert leaf.value.dtype == jnp.float32


def test_parameter_names_follow_the_2b4t_layout():
    params = nn.unbox(init_params(small_config(), get_recipe("b1.58"), RNG))
    layer = params["layers_0"]
    assert set(layer) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "attn_sub_norm"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj", "ffn_sub_norm"}
    assert layer["self_attn"]["k_proj"]["kernel"].shape == (32, 16)  # 2 KV heads of 8
    assert set(params) == {"embed_tokens", "norm", "lm_head", "layers_0", "layers_1"}


@pytest.mark.parametrize("tie", [False, True])
def test_logits_are_float32_not_rounded_to_the_compute_dtype(tie):
    # In bf16 compute the head's float32 accumulator goes to float32 logits directly, tied or
    # not (the untied lm_head once rounded them to bf16 first: steps of 0.03 at a logit of 5).
    config = small_config(dtype="bfloat16", tie_embeddings=tie)
    params = init_params(config, get_recipe("b1.58"), RNG)
    logits = np.asarray(jax.jit(Transformer(config, get_recipe("b1.58")).apply)(
        {"params": params}, tokens()))
    assert logits.dtype == np.float32
    as_bf16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(logits != as_bf16) > 0.9


def test_integer_model_equals_fake_quant_model():
    config = small_config()
    recipe = get_recipe("b1.58")
    params = init_params(config, recipe, RNG)
    fake = jax.jit(Transformer(config, recipe).apply)({"params": params}, tokens())
    integer = jax.jit(Transformer(config, recipe, integer=True).apply)({"params": params}, tokens())
    np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="integer"):
        Transformer(config, get_recipe("bf16"), integer=True).init(RNG, tokens())


def test_int8_backward_changes_only_input_gradients_in_the_model():
    config = small_config()
    recipe = get_recipe("b1.58")
    params = init_params(config, recipe, RNG)
    toks = tokens()

    def loss_and_grads(**flags):
        model = Transformer(config, recipe, integer=True, **flags)
        loss = lambda p: jnp.mean(model.apply({"params": p}, toks).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss, grads), (loss_exact, grads_exact) = (loss_and_grads(int8_backward=True),
                                                loss_and_grads())
    assert loss == loss_exact
    flat, flat_exact = (traverse_util.flatten_dict(nn.unbox(g)) for g in (grads, grads_exact))
    # The last layer's MLP down-projection sees the loss gradient before any int8 product.
    down = next(k for k in flat if "layers_1" in k and "down_proj" in k)
    np.testing.assert_array_equal(flat[down], flat_exact[down])
    assert any(not np.array_equal(flat[k], flat_exact[k]) for k in flat)
    for k in flat:
        np.testing.assert_allclose(flat[k], flat_exact[k], rtol=0.1,
                                   atol=0.05 * float(np.abs(flat_exact[k]).max()) + 1e-8)
    with pytest.raises(ConfigError, match="int8_backward"):
        Transformer(config, recipe, int8_backward=True).init(RNG, tokens())


def test_training_gradients_reach_every_parameter():
    config = small_config()
    recipe = get_recipe("b1.58")
    params = init_params(config, recipe, RNG)
    model = Transformer(config, recipe)
    toks = tokens()

    def loss(p):
        logits = model.apply({"params": p}, toks[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    grads = jax.grad(loss)(nn.unbox(params))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("changes,field", [
    (dict(n_heads=5), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=36, n_heads=12), "head_dim"),
    (dict(ffn_activation="gelu"), "ffn_activation"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dtype="int8"), "dtype"),
])
def test_impossible_configs_fail_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        small_config(**changes)


def test_presets_and_overrides():
    assert get_model_config("ladder-50k", vocab_size=512).vocab_size == 512
    with pytest.raises(ConfigError, match="ladder-50k"):
        get_model_config("ladder-51k")
    with pytest.raises(ConfigError, match="n_layer"):
        get_model_config("ladder-50k", n_layer=3)
    with pytest.raises(ConfigError, match="group size"):
        validate_recipe_for_model(small_config(), get_recipe("b1.58@g24"))


def test_2b4t_preset_is_the_released_shape():
    c = PRESETS["bitnet-2b4t"]
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
        2560, 30, 20, 5, 128, 6912)
    assert (c.vocab_size, c.rope_theta, c.norm_eps, c.max_seq_len) == (128256, 500000.0, 1e-5, 4096)
    assert (c.ffn_activation, c.norm_placement, c.tie_embeddings) == ("relu2", "subln", True)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("ladder")])
def test_ladder_presets_run(name):
    config = PRESETS[name]
    recipe = get_recipe("b1.58")
    shapes = jax.eval_shape(lambda: init_params(config, recipe, RNG))
    out = jax.eval_shape(lambda p: Transformer(config, recipe).apply({"params": p}, tokens(1, 16, 320)),
                         shapes)
    assert out.shape == (1, 16, config.vocab_size)


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
def test_linear_table_is_the_models_kernels(placement):
    """model.linears' table names every decoder kernel the model creates, with its shape."""
    config = small_config(norm_placement=placement, head_dim=16, d_ff=96)
    tree = nn.unbox(jax.eval_shape(lambda: init_params(config, get_recipe("b1.58"), RNG)))
    kernels = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(tree).items()
               if path[-1] == "kernel" and path[0].startswith("layers_")}
    expected = {kernel_path(i, linear): linear.shape(config)
                for i in range(config.n_layers) for linear in DECODER_LINEARS}
    assert kernels == expected
    assert all(decoder_linear(path).shape(config) == shape for path, shape in kernels.items())
    assert decoder_linear(("lm_head", "kernel")) is None
    assert {linear.role for linear in DECODER_LINEARS} == set(LINEAR_ROLES)
