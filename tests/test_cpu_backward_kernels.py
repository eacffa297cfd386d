"""The quantized matmul with its backward's bf16 products in our kernels (`cpu_input_gradient`,
`cpu_weight_gradient`: on AMX tiles, or on AVX512-BF16 vectors on CPUs without AMX) equals the
same program with XLA's dots bit for bit, on both paths, for 8-bit absmax and 4-bit absmean
activations. Runs where `cpu_int8.bf16_products` names a place (the `bf16_kernels` fixture
skips elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_int8, matmul
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer


def _bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.uint32)


@pytest.mark.parametrize("integer,int8_backward", [(False, False), (True, False), (True, True)],
                         ids=["fake", "integer", "int8-backward"])
@pytest.mark.parametrize("qx", [ActivationQuantizer("absmax", 8),
                                ActivationQuantizer("absmean", 4)], ids=["a8", "a4"])
def test_quantized_dot_with_the_backward_kernels_equals_it_without(qx, integer, int8_backward,
                                                                    bf16_kernels):
    """dx through `codes_input_gradient` (the exact paths) and dW through
    `quantized_weight_gradient`, where they run: the gradients XLA's dots give, bit for bit,
    with a contraction (the tokens) past XLA's first block of 2048 on vectors."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_t(3, (3, 1000, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(0, 0.02, (96, 80)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 1000, 80)), jnp.float32)

    def run():
        # y itself, not a loss made of it: XLA may drop bf16 roundings inside a program (its
        # excess-precision rule), where a custom call's bf16 output is rounded.
        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, qx, WeightQuantizer("ternary", 1.58), jnp.bfloat16,
                                     integer, int8_backward)
            return jnp.sum(y.astype(jnp.float32) * g), y
        fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        return fn.lower(x, w).compile().as_text(), jax.block_until_ready(fn(x, w))

    hlo, got = run()
    assert hlo.count(cpu_int8.CODES_INPUT_GRADIENT_TARGET) == (0 if int8_backward else 1)
    assert hlo.count(cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET) == 1
    bf16_kernels()  # off: XLA's dots
    hlo, want = run()
    assert cpu_int8.CODES_INPUT_GRADIENT_TARGET not in hlo
    assert cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
