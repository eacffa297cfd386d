"""The kernels' products on AMX tiles (`kernels/int8_matmul.cc`) equal XLA's int8 dot and the
same kernels on AVX-512 VNNI bit for bit, and the quantized matmul that routes through them (and
through `kernels/weight_gradient.cc`) equals the path without them. Runs where the CPU has AMX
(Intel Sapphire Rapids and later; the suite otherwise keeps BITNET_JAX_CPU_AMX=0, `conftest.py`),
except the last test: the backward's bf16 kernels against XLA's dots, on AMX tiles or on
AVX512-BF16 vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_int8, cpu_int8_fused, matmul
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer

pytestmark = pytest.mark.skipif(not cpu_int8.available(),
                                reason=f"int8 kernels unavailable: "
                                       f"{cpu_int8.unavailable_reason()}")


def _bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.int32)


# Packed path only (the few rows of decoding keep VNNI's direct path): one 16-row tile and its
# tails, row blocks past the first (240 rows), K not a multiple of 4 or 64, N not a multiple of
# 16 or of the 64-column panel.
SHAPES = [(17, 1, 5), (33, 64, 64), (100, 77, 33), (250, 130, 200), (300, 1000, 70),
          (64, 4, 129)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_dot_on_tiles_equals_xla(m, k, n, amx_tiles):
    amx_tiles(True)
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    w = jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8)
    want = jax.jit(cpu_int8._xla_int8_dot)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_int8.int8_dot)(x, w)), want(x, w))
    extreme = jnp.full((m, k), -128, jnp.int8)  # the largest sums int8 codes can make
    np.testing.assert_array_equal(np.asarray(cpu_int8.int8_dot(extreme, extreme[:n])),
                                  want(extreme, extreme[:n]))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fused_products_on_tiles_equal_vnni(m, k, n, amx_tiles):
    rng = np.random.default_rng(3 * m + k)
    x = jnp.asarray(rng.standard_t(3, (m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-1, 2, (n, k)), jnp.int8)
    w_scale = jnp.asarray(rng.lognormal(-3, 1, n), jnp.float32)
    codes, mult, scale = cpu_int8_fused.absmax_quantize(x)

    def products():  # finished before the switch moves: the kernels read it when they run
        return jax.block_until_ready((
            cpu_int8_fused.absmax_quant_dot(x, w, w_scale),
            cpu_int8_fused.absmax_quant_dot(x, w, w_scale, floor=0.0),
            cpu_int8_fused.scaled_quant_dot(x, w, w_scale, mult, scale, -8, 7),
            cpu_int8_fused.int8_scaled_dot(codes, scale, w, w_scale)))

    amx_tiles(True)
    got = products()
    amx_tiles(False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(products())):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def _quantized_dot_grads(lead, qx, integer, int8_backward):
    """`run()`: (the compiled HLO text, (dx, dW) and y) of the quantized matmul of x (*lead, 96)
    and a ternary w (96, 80) under a fixed cotangent, traced and run anew at each call (the
    kernels' routing is decided while tracing, and they read AMX's switch when they run)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_t(3, (*lead, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(0, 0.02, (96, 80)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(*lead, 80)), jnp.float32)

    def run():
        # y itself, not a loss made of it: XLA may drop bf16 roundings inside a program (its
        # excess-precision rule), where a custom call's bf16 output is rounded.
        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, qx, WeightQuantizer("ternary", 1.58), jnp.bfloat16,
                                     integer, int8_backward)
            return jnp.sum(y.astype(jnp.float32) * g), y
        fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        # Finished before the switch moves: the kernels read it when they run.
        return fn.lower(x, w).compile().as_text(), jax.block_until_ready(fn(x, w))
    return run


PATHS = pytest.mark.parametrize("integer,int8_backward",
                                [(False, False), (True, False), (True, True)],
                                ids=["fake", "integer", "int8-backward"])
ACTIVATIONS = pytest.mark.parametrize("qx", [ActivationQuantizer("absmax", 8),
                                             ActivationQuantizer("absmean", 4)], ids=["a8", "a4"])


@PATHS
@ACTIVATIONS
def test_quantized_dot_on_tiles_equals_it_without(qx, integer, int8_backward, amx_tiles):
    """On AMX tiles the products of both paths go through `int8_scaled_dot` (the exact input
    gradient through `codes_input_gradient`, the int8 one through `absmax_quant_dot`, the weight
    gradient through `quantized_weight_gradient`): output and gradients equal the program
    without AMX (VNNI kernels, or fake quantization's bf16 codes; XLA's dots for dx and dW) bit
    for bit."""
    run = _quantized_dot_grads((2, 48), qx, integer, int8_backward)
    amx_tiles(True)
    hlo, got = run()
    assert cpu_int8.INT8_SCALED_DOT_TARGET in hlo
    assert hlo.count(cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET) == 1
    assert cpu_int8.QUANTIZE_TRANSPOSE_TARGET not in hlo  # X_q^T never written
    assert hlo.count(cpu_int8.CODES_INPUT_GRADIENT_TARGET) == (0 if int8_backward else 1)
    amx_tiles(False)
    hlo, want = run()
    assert cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET not in hlo
    assert cpu_int8.CODES_INPUT_GRADIENT_TARGET not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@PATHS
@ACTIVATIONS
def test_the_backward_kernels_give_xlas_gradients(qx, integer, int8_backward, bf16_kernels):
    """dx through `codes_input_gradient` (the exact paths) and dW through
    `quantized_weight_gradient` wherever they run (AMX tiles, or AVX512-BF16 vectors on CPUs
    without AMX): the gradients of the program with XLA's dots, bit for bit, with a contraction
    (the tokens) past XLA's first block of 2048 on vectors."""
    run = _quantized_dot_grads((3, 1000), qx, integer, int8_backward)
    hlo, got = run()
    assert hlo.count(cpu_int8.CODES_INPUT_GRADIENT_TARGET) == (0 if int8_backward else 1)
    assert hlo.count(cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET) == 1
    bf16_kernels()  # off: XLA's dots
    hlo, want = run()
    assert cpu_int8.CODES_INPUT_GRADIENT_TARGET not in hlo
    assert cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
