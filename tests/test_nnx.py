"""The NNX modules equal the linen ones: BitLinear forward and gradients for every recipe (inner
norm, integer products, Hadamard, per-channel and per-group scales), the same parameter names
and logical axes, and the bridged Transformer's logits; the bridged model trains with
nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import linen as nn

from bitnet_jax.core.precision import PRESETS, get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.model import layers
from bitnet_jax.model import nnx as bitnet_nnx
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params

# Both modules call the same jnp functions in the same order on the same values, so they agree
# exactly; any difference at all is a different computation.
RECIPES = sorted(PRESETS) + ["b1.58@channel", "w4a8@g32", "w2a16", "w4a8", "w1a4"]
N_IN, N_OUT = 64, 48
AXES = ("embed", "mlp")


def linear_cases(recipe_name: str):
    """Each distinct linear precision of a recipe, with and without the inner norm, on the
    float and (where the recipe allows) the integer product."""
    precisions = list(dict.fromkeys(get_recipe(recipe_name).roles.values()))
    for precision in precisions:
        for inner_norm in (False, True):
            for integer in (False, True) if precision.supports_integer_matmul else (False,):
                yield precision, inner_norm, integer


def pure(tree) -> dict:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_nnx_bitlinear_equals_linen_forward_and_gradients(recipe_name):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, N_IN)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 5, N_OUT)), jnp.float32)
    for precision, inner_norm, integer in linear_cases(recipe_name):
        settings = dict(precision=precision, kernel_axes=AXES, inner_norm=inner_norm,
                        integer=integer, dtype=jnp.float32)
        linen = layers.BitLinear(N_OUT, **settings)
        params = nn.unbox(linen.init(jax.random.PRNGKey(1), x)["params"])
        if inner_norm:  # a scale that is not all ones, so its gradient path is exercised
            params["norm"]["scale"] = jnp.linspace(0.5, 1.5, N_IN)
        module = bitnet_nnx.BitLinear(N_IN, N_OUT, **settings, rngs=nnx.Rngs(2))
        nnx.update(module, nnx.State(params))
        assert_trees_equal(pure(nnx.state(module, nnx.Param)), params)

        y_linen = linen.apply({"params": params}, x)
        np.testing.assert_array_equal(module(x), y_linen)
        assert float(jnp.abs(y_linen).max()) > 0.1

        def linen_loss(p, inputs):
            return jnp.sum(linen.apply({"params": p}, inputs) * cotangent)

        def nnx_loss(m, inputs):
            return jnp.sum(m(inputs) * cotangent)

        grads_linen = jax.grad(linen_loss, argnums=(0, 1))(params, x)
        grads_nnx = nnx.grad(nnx_loss, argnums=(0, 1))(module, x)
        assert_trees_equal(pure(grads_nnx[0]), grads_linen[0])
        np.testing.assert_array_equal(grads_nnx[1], grads_linen[1])
        assert float(jnp.abs(grads_linen[0]["kernel"]).max()) > 0


def test_nnx_bitlinear_carries_the_logical_axes_of_the_linen_one():
    x = jnp.zeros((1, 2, N_IN))
    linen = layers.BitLinear(N_OUT, get_recipe("b1.58").qkv, ("embed", "heads"), inner_norm=True)
    boxed = linen.init(jax.random.PRNGKey(0), x)["params"]
    module = bitnet_nnx.BitLinear(N_IN, N_OUT, get_recipe("b1.58").qkv, ("embed", "heads"),
                                  inner_norm=True, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    assert tuple(specs["kernel"].get_value()) == boxed["kernel"].names == ("embed", "heads")
    assert tuple(specs["norm"]["scale"].get_value()) == boxed["norm"]["scale"].names == ("embed",)
    with nn.logical_axis_rules([("embed", None), ("heads", "tensor")]):
        specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
    assert tuple(specs["kernel"].get_value()) == (None, "tensor")


TINY = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                   max_seq_len=32, dtype="float32")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 16)), jnp.int32)


@pytest.mark.parametrize("recipe_name,norm_placement,integer", [
    ("bf16", "pre", False), ("b1.58", "subln", True),
    pytest.param("v2-a4", "bitlinear", False, marks=pytest.mark.slow),
    pytest.param("a4.8", "subln", False, marks=pytest.mark.slow)])
def test_bridged_transformer_gives_the_linen_logits(recipe_name, norm_placement, integer):
    config = TINY.replace(norm_placement=norm_placement)
    params = nn.unbox(init_params(config, get_recipe(recipe_name), jax.random.PRNGKey(3)))
    model = bitnet_nnx.transformer(config, recipe_name, integer=integer, params=params)
    expected = Transformer(config, get_recipe(recipe_name), integer).apply({"params": params},
                                                                          TOKENS)
    np.testing.assert_array_equal(model(TOKENS), expected)
    assert_trees_equal(bitnet_nnx.linen_params(model), params)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["embed_tokens"]["embedding"].get_value()) == ("vocab", "embed")
    assert tuple(specs["layers_0"]["mlp"]["down_proj"]["kernel"].get_value()) == ("mlp", "embed")


@pytest.mark.slow
def test_bridged_transformer_trains_one_optimizer_step():
    model = bitnet_nnx.transformer(TINY, "b1.58", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    before = bitnet_nnx.linen_params(model)

    def loss_fn(m):
        logits = m(TOKENS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    first = train_step(model, optimizer)
    after = bitnet_nnx.linen_params(model)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert all(jax.tree.leaves(moved))  # every parameter, ternary kernels included, was updated
    # The step is the linen model's: its loss on the updated parameters went down.
    assert float(loss_fn(model)) < float(first)
    linen_logits = Transformer(TINY, get_recipe("b1.58")).apply({"params": after}, TOKENS)
    np.testing.assert_array_equal(model(TOKENS), linen_logits)


def test_load_params_refuses_another_shape():
    model = bitnet_nnx.transformer(TINY, "bf16")
    other = nn.unbox(init_params(TINY.replace(n_layers=1), get_recipe("bf16"),
                                 jax.random.PRNGKey(0)))
    with pytest.raises(ConfigError, match="do not fit this model: missing"):
        bitnet_nnx.load_params(model, other)
