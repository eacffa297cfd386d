import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.errors import ConfigError
from bitnet_jax.infer.sampling import SamplingConfig, keep_top_k, keep_top_p, sample

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def draws(config: SamplingConfig, logits=LOGITS, n: int = 20000) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    tokens = jax.vmap(lambda k: sample(logits, k, config)[0])(keys)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[-1]) / n


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 50))
    tokens = sample(logits, jax.random.PRNGKey(0), SamplingConfig())
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("config", [SamplingConfig(temperature=2.0, top_k=1),
                                    SamplingConfig(temperature=2.0, top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_are_greedy(config):
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 50))
    for seed in range(3):
        tokens = sample(logits, jax.random.PRNGKey(seed), config)
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


def test_temperature_sampling_follows_the_softmax():
    np.testing.assert_allclose(draws(SamplingConfig(temperature=1.0)), PROBS, atol=0.015)
    sharpened = PROBS ** 2 / np.sum(PROBS ** 2)  # temperature 0.5 squares the probabilities
    np.testing.assert_allclose(draws(SamplingConfig(temperature=0.5)), sharpened, atol=0.015)


def test_top_k_renormalises_over_the_k_most_likely():
    frequencies = draws(SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(frequencies, [0.625, 0.375, 0, 0], atol=0.015)


@pytest.mark.parametrize("p,kept", [(0.45, 1), (0.7, 2), (0.79, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    filtered = np.asarray(keep_top_p(LOGITS, p))[0]
    assert np.isfinite(filtered).sum() == kept
    assert np.isfinite(filtered[:kept]).all()


def sorted_cumulative_top_p(logits, p):
    """Top-p as a sort and a cumulative sum in float64: the reference (and the earlier code)."""
    x = np.asarray(logits, np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-x, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, -1)
    before = np.cumsum(ranked, -1) - ranked
    kept = np.where(before < p, np.take_along_axis(x, order, -1), np.inf)
    threshold = kept.min(-1, keepdims=True)
    margin = np.abs(before - p).min(-1)  # how close a row's boundary is to p
    return x >= threshold, margin


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_without_a_sort_keeps_what_the_sorted_cumulative_sum_keeps(dtype, p):
    """On 64 rows of 1000 logits over a wide range (and with ties in bf16): the same tokens as
    a float64 sort and cumulative sum, wherever no row's boundary lies within 1e-6 of p."""
    rng = np.random.default_rng(int(p * 100))
    logits = jnp.asarray(rng.normal(size=(64, 1000)) * rng.uniform(0.5, 6, (64, 1)), dtype)
    got = np.isfinite(np.asarray(jax.jit(keep_top_p, static_argnums=1)(logits, p)))
    want, margin = sorted_cumulative_top_p(logits, p)
    rows = margin > 1e-6
    assert rows.sum() >= 56
    np.testing.assert_array_equal(got[rows], want[rows])
    assert got.sum(-1).min() >= 1


@pytest.mark.parametrize("p", [1.0, 0.99999994])
def test_top_p_near_1_keeps_every_token_that_weighs(p):
    """A softmax's float32 sum can fall just short of p: p is then the whole row's weight, and no
    row is left empty (without the cap, 6 of these 16 rows kept nothing at p = 1)."""
    logits = jax.random.normal(jax.random.PRNGKey(5), (16, 1000))
    kept = np.isfinite(np.asarray(keep_top_p(logits, p)))
    assert kept.sum(-1).min() >= 990


def test_keep_top_p_keeps_ties_whole_and_follows_top_k():
    # 0.4 + 0.2 + 0.2 + 0.2: p = 0.5 is reached inside the tie, which is kept whole
    logits = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.2]], jnp.float32))
    np.testing.assert_array_equal(np.isfinite(np.asarray(keep_top_p(logits, 0.5))), True)
    np.testing.assert_array_equal(np.isfinite(np.asarray(keep_top_p(logits, 0.3)))[0],
                                  [False, True, False, False])
    # after top-k the others are -inf: they weigh nothing and stay out
    both = keep_top_p(keep_top_k(jnp.asarray([[3.0, 2.0, 1.0, 0.0]]), 2), 0.99)
    np.testing.assert_array_equal(np.isfinite(np.asarray(both))[0], [True, True, False, False])


def test_keep_top_k_keeps_ties():
    logits = jnp.asarray([[3.0, 1.0, 1.0, 0.0]])
    assert np.isfinite(np.asarray(keep_top_k(logits, 2))).sum() == 3


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)
