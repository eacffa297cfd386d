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


def test_keep_top_k_keeps_ties():
    logits = jnp.asarray([[3.0, 1.0, 1.0, 0.0]])
    assert np.isfinite(np.asarray(keep_top_k(logits, 2))).sum() == 3


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplingConfig(**kwargs)
