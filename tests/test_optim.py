"""Schedules, weight-decay mask and AdamW updates against values worked out by hand."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitnet_jax.config import OptimizerConfig
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import ModelConfig, init_params
from bitnet_jax.train.optim import (current_hyperparams, learning_rate_schedule, make_optimizer,
                              precision_for_step, precision_switch_step, stage2_peak_lr,
                              stage2_switch_step, weight_decay_mask, weight_decay_schedule)
from bitnet_jax.core.precision import get_recipe

TOTAL = 1000
# 700M b1.58 recipe: 1.5e-3 -> 1e-3, warm-up 100, switch at step 500, final 10% of each peak.
BASE = OptimizerConfig(lr=1.5e-3, stage2_lr=1e-3, warmup_steps=100, stage2_fraction=0.5,
                       min_lr_ratio=0.1, weight_decay=0.1, stage2_weight_decay=0.0)


def cfg_with(**changes) -> OptimizerConfig:
    return dataclasses.replace(BASE, **changes)


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def cos_frac(t, n):
    """optax's cosine factor 0.5 (1 + cos(pi t / n))."""
    return 0.5 * (1 + math.cos(math.pi * t / n))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules.

def test_bitnet_linear_schedule_by_hand():
    steps = [0, 50, 100, 300, 499, 500, 750, 999, 1000]
    # Stage 1: 1.5e-3 -> 1e-3 over steps 100..1000, cut at 500.
    # Stage 2: 1e-3 -> 1e-4 over steps 500..1000.
    expected = [0.0, 0.75e-3, 1.5e-3,
                1.5e-3 - 0.5e-3 * 200 / 900,
                1.5e-3 - 0.5e-3 * 399 / 900,
                1e-3,
                1e-3 - 0.9e-3 * 250 / 500,
                1e-3 - 0.9e-3 * 499 / 500,
                1e-4]
    got = values(learning_rate_schedule(BASE, TOTAL), steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_bitnet_cosine_schedule_by_hand():
    cfg = cfg_with(decay="cosine")
    steps = [50, 100, 499, 500, 999, 1000]
    expected = [0.75e-3, 1.5e-3,
                1e-3 + 0.5e-3 * cos_frac(399, 900),
                1e-3,
                1e-4 + 0.9e-3 * cos_frac(499, 500),
                1e-4]
    got = values(learning_rate_schedule(cfg, TOTAL), steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_bitnet_switch_is_an_abrupt_drop_to_the_stage2_peak(decay):
    cfg = cfg_with(decay=decay)
    lr = values(learning_rate_schedule(cfg, TOTAL), range(TOTAL))
    assert stage2_switch_step(cfg, TOTAL) == 500
    assert np.all(lr[100:500] > 1e-3)  # stage 1 never reaches the stage-2 peak
    assert lr[499] - lr[500] > 0.2e-3  # a drop, not a kink
    assert np.all(np.diff(lr[100:500]) < 0) and np.all(np.diff(lr[500:]) < 0)
    assert np.all(np.diff(lr[:101]) > 0)


def test_stage2_peak_defaults_to_two_thirds():
    assert stage2_peak_lr(cfg_with(stage2_lr=None)) == pytest.approx(1e-3)
    lr = learning_rate_schedule(cfg_with(stage2_lr=None, lr=1.2e-3), TOTAL)
    assert float(lr(500)) == pytest.approx(8e-4, rel=1e-6)  # 1.3B-3.9B recipe


def test_cosine_schedule_by_hand():
    cfg = cfg_with(schedule="cosine")
    steps = [0, 50, 100, 550, 999, 1000]
    expected = [0.0, 0.75e-3, 1.5e-3, 1.5e-4 + 1.35e-3 * 0.5,
                1.5e-4 + 1.35e-3 * cos_frac(899, 900), 1.5e-4]
    got = values(learning_rate_schedule(cfg, TOTAL), steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_wsd_schedule_by_hand():
    cfg = cfg_with(schedule="wsd", wsd_decay_fraction=0.2)  # decay over steps 800..1000
    steps = [0, 50, 100, 500, 799, 800, 900, 999, 1000]
    expected = [0.0, 0.75e-3, 1.5e-3, 1.5e-3, 1.5e-3, 1.5e-3, 1.5e-3 - 1.35e-3 * 0.5,
                1.5e-3 - 1.35e-3 * 199 / 200, 1.5e-4]
    got = values(learning_rate_schedule(cfg, TOTAL), steps)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_constant_schedule_by_hand():
    cfg = cfg_with(schedule="constant")
    got = values(learning_rate_schedule(cfg, TOTAL), [0, 50, 100, 500, 999])
    np.testing.assert_allclose(got, [0.0, 0.75e-3, 1.5e-3, 1.5e-3, 1.5e-3], rtol=1e-6)
    no_warmup = learning_rate_schedule(cfg_with(schedule="constant", warmup_steps=0), TOTAL)
    assert float(no_warmup(0)) == pytest.approx(1.5e-3)


def test_schedule_is_jittable_on_a_step_array():
    lr = learning_rate_schedule(BASE, TOTAL)
    got = jax.jit(lr)(jnp.array([100, 500], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), [1.5e-3, 1e-3], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Weight decay schedule and logging.

def test_weight_decay_stops_exactly_at_the_switch():
    wd = weight_decay_schedule(BASE, TOTAL)
    np.testing.assert_allclose(values(wd, [0, 250, 499, 500, 999]), [0.1, 0.1, 0.1, 0.0, 0.0])
    other = weight_decay_schedule(cfg_with(schedule="cosine"), TOTAL)
    np.testing.assert_allclose(values(other, [0, 499, 500, 999]), [0.1] * 4, rtol=1e-6)
    assert stage2_switch_step(cfg_with(schedule="cosine"), TOTAL) is None


def test_current_hyperparams():
    assert current_hyperparams(BASE, TOTAL, 499)["weight_decay"] == pytest.approx(0.1)
    hp = current_hyperparams(BASE, TOTAL, 500)
    assert hp == {"lr": pytest.approx(1e-3), "weight_decay": 0.0}


def test_impossible_configs_fail_with_the_field_named():
    with pytest.raises(ConfigError, match="stage2_lr"):
        learning_rate_schedule(cfg_with(stage2_lr=2e-3), TOTAL)
    with pytest.raises(ConfigError, match="warmup_steps"):
        learning_rate_schedule(cfg_with(warmup_steps=600), TOTAL)
    with pytest.raises(ConfigError, match="warmup_steps"):
        learning_rate_schedule(cfg_with(schedule="wsd", warmup_steps=900), TOTAL)


# ----------------------------------------------------------------------------------------------
# Weight-decay mask.

def test_mask_decays_matrices_only_on_a_real_model():
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    boxed = init_params(config, get_recipe("bf16"), jax.random.PRNGKey(0))
    params = nn.unbox(boxed)
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['embed_tokens']['embedding']"] is True
    assert flat["['lm_head']['kernel']"] is True
    assert flat["['layers_0']['self_attn']['q_proj']['kernel']"] is True
    assert flat["['layers_0']['mlp']['down_proj']['kernel']"] is True
    assert flat["['norm']['scale']"] is False
    assert flat["['layers_0']['input_layernorm']['scale']"] is False
    assert flat["['layers_0']['self_attn']['attn_sub_norm']['scale']"] is False
    assert flat["['layers_0']['mlp']['ffn_sub_norm']['scale']"] is False
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        assert flat[jax.tree_util.keystr(path)] == (leaf.ndim >= 2)

    # Boxed params give the same boxes around the same bools.
    boxed_mask = weight_decay_mask(boxed)
    assert jax.tree.structure(boxed_mask) == jax.tree.structure(boxed)
    assert jax.tree.leaves(nn.unbox(boxed_mask)) == jax.tree.leaves(mask)
    # Abstract params (optimizer init under eval_shape) work too.
    assert weight_decay_mask(jax.eval_shape(lambda: params)) == mask


# ----------------------------------------------------------------------------------------------
# AdamW updates against numpy.

def numpy_adamw(params, grads_seq, mask, *, lr, wd, b1, b2, eps, clip):
    """AdamW with global-norm clipping and decoupled, LR-scaled, masked weight decay."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, clip / norm)
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1 ** t)
            v_hat = v[k] / (1 - b2 ** t)
            params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps)
                                          + wd * mask[k] * params[k])
        history.append({k: p.copy() for k, p in params.items()})
    return history


def test_two_adamw_updates_match_numpy():
    cfg = OptimizerConfig(schedule="constant", lr=0.1, warmup_steps=0, b1=0.9, b2=0.95,
                          eps=1e-8, weight_decay=0.5, clip_norm=1.0)
    params = {"w": jnp.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]]),
              "b": jnp.array([0.5, -0.5, 2.0])}
    grads = [
        # Norm sqrt(6 * 4 + 3) > 1: clipped.
        {"w": jnp.full((2, 3), 2.0), "b": jnp.array([1.0, -1.0, 1.0])},
        # Norm < 1: not clipped.
        {"w": jnp.array([[0.1, -0.2, 0.0], [0.3, 0.0, -0.1]]), "b": jnp.array([0.0, 0.2, -0.1])},
    ]
    assert float(optax.tree.norm(grads[0])) > 1.0 > float(optax.tree.norm(grads[1]))
    expected = numpy_adamw(params, grads, {"w": 1.0, "b": 0.0}, lr=0.1, wd=0.5, b1=0.9,
                           b2=0.95, eps=1e-8, clip=1.0)

    optimizer = make_optimizer(cfg, total_steps=10)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for step, grad in enumerate(grads):
        updates, state = update(grad, state, params)
        params = optax.apply_updates(params, updates)
        for k in params:
            np.testing.assert_allclose(np.asarray(params[k]), expected[step][k], rtol=1e-5,
                                       atol=1e-6, err_msg=f"step {step + 1}, param {k}")


def test_no_clipping_when_clip_norm_is_none():
    cfg = OptimizerConfig(schedule="constant", lr=0.1, warmup_steps=0, weight_decay=0.0,
                          clip_norm=None)
    params = {"w": jnp.zeros((2, 2))}
    grad = {"w": jnp.full((2, 2), 10.0)}
    optimizer = make_optimizer(cfg, 10)
    updates, _ = optimizer.update(grad, optimizer.init(params), params)
    # First Adam step is sign(g) * lr whatever the gradient's size.
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1, rtol=1e-6)


def test_weight_decay_stops_in_stage2():
    # Zero gradients: the Adam term vanishes, so a matrix only shrinks by (1 - lr_t * wd_t).
    cfg = OptimizerConfig(schedule="bitnet", lr=0.1, stage2_lr=0.05, warmup_steps=0,
                          stage2_fraction=0.5, weight_decay=0.5, stage2_weight_decay=0.0,
                          clip_norm=1.0)
    total = 10
    lr = learning_rate_schedule(cfg, total)
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    optimizer = make_optimizer(cfg, total)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    expected_w = 1.0
    trace = []
    for step in range(total):
        updates, state = update(zero, state, params)
        params = optax.apply_updates(params, updates)
        wd = 0.5 if step < 5 else 0.0
        expected_w *= 1.0 - float(lr(step)) * wd
        np.testing.assert_allclose(np.asarray(params["w"]), expected_w, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(params["scale"]), 1.0)  # masked: never decays
        trace.append(float(params["w"][0, 0]))
    assert all(b < a for a, b in zip([1.0] + trace[:4], trace[:5]))  # shrinks in stage 1
    assert len(set(trace[4:])) == 1  # constant from the switch (step 5) on


# ----------------------------------------------------------------------------------------------
# Two-stage precision (a4.8).

def test_precision_for_step_boundaries():
    args = ("a4.8", "b1.58", 0.95)
    assert precision_switch_step(*args, 1000) == 950
    assert precision_for_step(*args, 0, 1000) == "b1.58"
    assert precision_for_step(*args, 949, 1000) == "b1.58"
    assert precision_for_step(*args, 950, 1000) == "a4.8"
    assert precision_for_step(*args, 999, 1000) == "a4.8"
    # Nearest step, each stage keeps at least one step.
    assert precision_switch_step("a4.8", "b1.58", 0.29, 100) == 29
    assert precision_switch_step("a4.8", "b1.58", 0.99, 10) == 9
    # No stage 1: one precision throughout.
    assert precision_switch_step("a4.8", None, 0.95, 1000) is None
    assert precision_for_step("a4.8", None, 0.95, 0, 1000) == "a4.8"
    assert precision_switch_step("b1.58", "b1.58", 0.95, 1000) is None
