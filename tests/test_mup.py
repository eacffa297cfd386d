"""muP: the rule table, identity with `standard` at the base width, and the coordinate check.

The coordinate check (Tensor Programs V, section 5 / microsoft/mup's `coord_check`): train tiny
models of widths x1..x8 for a few Adam steps at one LR and measure each layer's output RMS on a
fixed batch. Under muP it stays flat across widths; under the standard parametrization, and
under muP without its LR multipliers, Adam's Theta(lr) coordinate updates add up over fan_in
correlated inputs and the hidden outputs grow with width.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.config import OptimizerConfig, load_config
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.model import kv_cache, mup
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params
from bitnet_jax.train import optim
from bitnet_jax.train.steps import TrainState, make_train_step

BASE_WIDTH = 32
WIDTH_MULTS = (1, 2, 4, 8)
VOCAB = 64


def width_config(mult: int, parametrization: str, **changes) -> ModelConfig:
    """Width x`mult` of a 32-wide base; two heads whose size grows (so 1/d attention matters)."""
    d_model = BASE_WIDTH * mult
    fields = dict(vocab_size=VOCAB, d_model=d_model, n_layers=2, n_heads=2, d_ff=2 * d_model,
                  max_seq_len=32, dtype="float32", parametrization=parametrization,
                  mup_base_d_model=BASE_WIDTH, mup_base_head_dim=BASE_WIDTH // 2)
    return ModelConfig(**{**fields, **changes})


def batches(count: int, batch: int = 8, length: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = [jnp.asarray(rng.integers(0, VOCAB, (batch, length + 1)), jnp.int32)
            for _ in range(count)]
    return [{"inputs": r[:, :-1], "targets": r[:, 1:]} for r in rows]


def train(config: ModelConfig, precision: str, opt_cfg: OptimizerConfig, steps: int,
          optimizer_model_config="same"):
    """Params after `steps` Adam steps; `optimizer_model_config=None` drops the LR multipliers."""
    recipe = get_recipe(precision)
    model = Transformer(config, recipe)
    params = nn.unbox(init_params(config, recipe, jax.random.PRNGKey(0)))
    opt_model = config if optimizer_model_config == "same" else optimizer_model_config
    optimizer = optim.make_optimizer(opt_cfg, 100, opt_model)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    step = jax.jit(make_train_step(model, optimizer, 1))
    for batch in batches(steps):
        state, _ = step(state, batch)
    return model, state.params


COORD_OPT = OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0,
                            clip_norm=None)
COORD_STEPS = 3


def layer_rms(config: ModelConfig, precision: str, with_lr_multipliers: bool = True) -> dict:
    """RMS of every layer's output after COORD_STEPS steps, captured with Flax's
    `capture_intermediates` (each submodule's __call__ output; the model is not edited)."""
    model, params = train(config, precision, COORD_OPT, COORD_STEPS,
                          "same" if with_lr_multipliers else None)
    _, captured = model.apply({"params": params}, batches(1)[0]["inputs"],
                              capture_intermediates=True, mutable=["intermediates"])
    captured = captured["intermediates"]
    outputs = {"embedding": captured["embed_tokens"]["__call__"][0],
               "logits": captured["__call__"][0]}
    for i in range(config.n_layers):
        outputs[f"attention_{i}"] = captured[f"layers_{i}"]["self_attn"]["__call__"][0]
        outputs[f"mlp_{i}"] = captured[f"layers_{i}"]["mlp"]["__call__"][0]
    return {name: float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
            for name, x in outputs.items()}


def rms_by_width(parametrization: str, precision: str, mults=WIDTH_MULTS, **kwargs) -> dict:
    """layer -> [RMS at each width multiplier]."""
    per_width = [layer_rms(width_config(m, parametrization), precision, **kwargs) for m in mults]
    return {layer: [rms[layer] for rms in per_width] for layer in per_width[0]}


def spread(values) -> float:
    return max(values) / min(values)


# Measured (2026-12-01, 2-core CPU): under muP every layer's RMS stays within a factor 1.2-1.9
# over x1..x8; under standard the hidden outputs and logits grow 3.4-6x from x1 to x8.
FLAT, DRIFT = 2.5, 2.5
HIDDEN = ("attention_0", "mlp_0", "attention_1", "mlp_1")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "b1.58", "a4.8"])
def test_coordinate_check_flat_under_mup_and_drifting_under_standard(precision):
    under_mup = rms_by_width("mup", precision)
    for layer, values in under_mup.items():
        assert spread(values) < FLAT, (layer, values)
    under_standard = rms_by_width("standard", precision)
    for layer in HIDDEN + ("logits",):
        values = under_standard[layer]
        assert values[-1] / values[0] > DRIFT, (layer, values)
        assert values == sorted(values), (layer, values)  # grows with width


@pytest.mark.slow
def test_coordinate_check_fails_without_the_lr_multipliers():
    """The check has teeth: a muP model trained by a plain Adam (no 1/m on hidden matrices)
    drifts like the standard one."""
    drifting = rms_by_width("mup", "b1.58", mults=(1, 8), with_lr_multipliers=False)
    for layer in HIDDEN:
        values = drifting[layer]
        assert values[-1] / values[0] > DRIFT, (layer, values)


# ----------------------------------------------------------------------------------------------
# Identity at the base width.

def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("precision", ["bf16", "b1.58"])
def test_mup_is_standard_at_the_base_width(precision):
    """Same init, logits and training (bit for bit) when width and head size are the base's."""
    standard = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                           max_seq_len=32, dtype="float32")
    muP = standard.replace(parametrization="mup")  # bases default to the model's own sizes
    assert (muP.mup_base_d_model, muP.mup_base_head_dim) == (64, 16)
    opt_cfg = OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=1, weight_decay=0.1,
                              clip_norm=1.0)
    recipe = get_recipe(precision)
    assert_trees_equal(init_params(standard, recipe, jax.random.PRNGKey(1)),
                       init_params(muP, recipe, jax.random.PRNGKey(1)))
    model_s, params_s = train(standard, precision, opt_cfg, steps=3)
    model_m, params_m = train(muP, precision, opt_cfg, steps=3)
    assert_trees_equal(params_s, params_m)
    inputs = batches(1)[0]["inputs"]
    np.testing.assert_array_equal(model_s.apply({"params": params_s}, inputs),
                                  model_m.apply({"params": params_m}, inputs))


# ----------------------------------------------------------------------------------------------
# The rule table.

def test_multipliers_follow_the_table():
    config = width_config(4, "mup")
    params = init_params(config, get_recipe("b1.58"), jax.random.PRNGKey(0))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): scale for path, scale in
            jax.tree_util.tree_leaves_with_path(nn.unbox(mup.mup_multipliers(config, params)),
                                                is_leaf=lambda x: isinstance(x, mup.MupScale))}
    hidden = {name for name in flat if name.endswith("kernel") and name.startswith("layers_")}
    assert len(hidden) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    for name, scale in flat.items():
        expected = mup.MupScale(0.5, 0.25) if name in hidden else mup.MupScale(1.0, 1.0)
        assert scale == expected, name
    assert mup.output_multiplier(config) == 0.25
    assert mup.attention_scale(config) == pytest.approx(math.sqrt(16) / 64)  # 1/d, not 1/sqrt(d)
    standard = width_config(4, "standard")
    assert all(s == mup.MupScale() for s in jax.tree.leaves(
        mup.mup_multipliers(standard, nn.unbox(params)),
        is_leaf=lambda x: isinstance(x, mup.MupScale)))
    assert mup.output_multiplier(standard) == 1.0 and mup.attention_scale(standard) is None


def test_hidden_init_std_shrinks_like_one_over_sqrt_width():
    stds = {}
    for mult in (1, 8):
        params = nn.unbox(init_params(width_config(mult, "mup"), get_recipe("bf16"),
                                      jax.random.PRNGKey(0)))
        stds[mult] = (float(np.std(params["layers_0"]["mlp"]["up_proj"]["kernel"])),
                      float(np.std(params["embed_tokens"]["embedding"])),
                      float(np.std(params["lm_head"]["kernel"])))
    assert stds[8][0] / stds[1][0] == pytest.approx(1 / math.sqrt(8), rel=0.05)
    assert stds[8][1] == pytest.approx(stds[1][1], rel=0.05)  # embedding: constant
    assert stds[8][2] == pytest.approx(stds[1][2], rel=0.05)  # readout: constant (x 1/m fwd)


def test_optimizer_scales_adam_direction_of_hidden_matrices_but_not_the_decay():
    config = width_config(4, "mup")
    params = nn.unbox(init_params(config, get_recipe("bf16"), jax.random.PRNGKey(0)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    opt_cfg = OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.1,
                              clip_norm=None)

    def first_update(model_config, g, weight_decay):
        optimizer = optim.make_optimizer(OptimizerConfig(**{**opt_cfg.__dict__,
                                                            "weight_decay": weight_decay}),
                                         10, model_config)
        updates, _ = optimizer.update(g, optimizer.init(params), params)
        return updates

    plain, scaled = first_update(None, grads, 0.0), first_update(config, grads, 0.0)
    up_plain = plain["layers_0"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_allclose(scaled["layers_0"]["mlp"]["up_proj"]["kernel"], up_plain / 4,
                               rtol=1e-6)
    for path in (("embed_tokens", "embedding"), ("lm_head", "kernel"), ("norm", "scale")):
        np.testing.assert_array_equal(scaled[path[0]][path[1]], plain[path[0]][path[1]])
    # Decoupled decay (lr * wd * p) is the base model's at every width, as in MuAdamW.
    decay_plain = first_update(None, zero_grads, 0.1)
    decay_scaled = first_update(config, zero_grads, 0.1)
    np.testing.assert_allclose(decay_scaled["layers_0"]["mlp"]["up_proj"]["kernel"],
                               decay_plain["layers_0"]["mlp"]["up_proj"]["kernel"], rtol=1e-6)


def test_cached_decoding_uses_the_mup_attention_scale():
    """The decode path (KV cache) gives the full forward's logits under 1/d attention."""
    config = width_config(4, "mup")
    model = Transformer(config, get_recipe("bf16"))
    params = nn.unbox(init_params(config, get_recipe("bf16"), jax.random.PRNGKey(0)))
    tokens = batches(1, batch=2, length=10)[0]["inputs"]
    full = model.apply({"params": params}, tokens)
    cache = kv_cache.init_cache(config.n_layers, 2, 12, config.n_kv_heads, config.head_dim,
                                jnp.float32)
    prefill, cache = model.apply({"params": params}, tokens[:, :9], cache=cache)
    step, _ = model.apply({"params": params}, tokens[:, 9:], cache=cache)
    np.testing.assert_allclose(prefill, full[:, :9], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(step[:, 0], full[:, 9], atol=1e-5, rtol=1e-5)
    standard_scale = Transformer(config.replace(parametrization="standard"), get_recipe("bf16"))
    assert not np.allclose(standard_scale.apply({"params": params}, tokens), full)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.parametrization='mu'"):
        width_config(1, "mu")
    with pytest.raises(ConfigError, match="model.mup_base_d_model"):
        width_config(1, "mup", mup_base_d_model=0)
    config = load_config(overrides=["model.parametrization=mup", "model.mup_base_d_model=64",
                                    "logging.wandb=disabled"])
    assert config.model.overrides["parametrization"] == "mup"
