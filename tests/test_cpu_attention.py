"""cpu_attention: jax.nn attention's numbers, with every product on XLA:CPU's bf16 path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.model import cpu_attention
from bitnet_jax.model.layers import causal_attention


def _qkv(batch, length, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    g = jax.random.normal(keys[3], (batch, length, heads, head_dim), dtype)
    return q, k, v, g


def _value_and_grads(attend, q, k, v, g):
    """Attention output and the gradients of <output, g> for q, k, v."""
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
    return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("heads,kv_heads,q_offset,scale", [
    (4, 4, 0, None), (4, 2, 0, None), (4, 1, 5, 0.3), (2, 2, 7, None)])
def test_block_equals_jax_nn_in_float32(heads, kv_heads, q_offset, scale):
    """Queries at positions q_offset.. over all earlier keys: values and all three gradients
    equal jax.nn's (float32 everywhere, so only the order of sums differs)."""
    q, k, v, g = _qkv(2, 12, heads, kv_heads, 8)
    q, g = q[:, q_offset:], g[:, q_offset:]
    mask = cpu_attention.visible_keys(q_offset, q.shape[1], k.shape[1])[None, None]
    ours = _value_and_grads(
        lambda q, k, v: cpu_attention.causal_attention_block(q, k, v, q_offset, scale), q, k, v, g)
    want = _value_and_grads(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask), q, k, v, g)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_matches_float32_to_bf16_precision():
    """In bf16 the products take bf16 operands (probabilities and score gradients rounded, as
    the XLA program says): within bf16 rounding of the float32 result, values and gradients."""
    q, k, v, g = _qkv(2, 32, 4, 2, 16, seed=1)
    want = _value_and_grads(lambda q, k, v: causal_attention(q, k, v, block=16), q, k, v, g)
    bf16 = [t.astype(jnp.bfloat16) for t in (q, k, v, g)]
    got = _value_and_grads(lambda q, k, v: causal_attention(q, k, v, block=16), *bf16)
    for ours, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert ours.dtype == jnp.bfloat16
        ours, expected = np.asarray(ours, np.float32), np.asarray(expected)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=0.03 * np.abs(expected).max())


def _dot_operand_types(hlo_text: str) -> list[tuple[str, ...]]:
    """Element types of the operands of every dot in compiled HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo_text))
    dots = re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo_text)
    return [(types[lhs], types[rhs]) for lhs, rhs in dots]


def test_every_product_stays_bf16_on_cpu():
    """The point of the module: XLA:CPU converts the operands of a product that its bf16
    library path refuses to float32. None of the training step's attention products is."""
    q, k, v, g = (t.astype(jnp.bfloat16) for t in _qkv(2, 32, 4, 2, 16))

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, block=16).astype(jnp.float32)
                       * g.astype(jnp.float32))

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    operand_types = _dot_operand_types(hlo)
    assert len(operand_types) == 2 * 6  # two query blocks, six products each
    assert set(operand_types) == {("bf16", "bf16")}
