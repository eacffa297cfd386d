"""The ternary codec: float kernels -> codes and scales -> bytes, and back, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import codec, matmul, packing, quant
from bitnet_jax.core.precision import WeightQuantizer


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None),
                                                     ("group", 8)])
def test_float_to_codes_to_bytes_and_back_is_exact(granularity, group_size):
    kernel_IxO = np.random.default_rng(0).normal(0, 0.02, (24, 10)).astype(np.float32)
    codes_OxI, gamma = codec.ternary_codes(kernel_IxO, granularity, group_size)
    # The model's forward quantization (on CPUs our kernel for per-tensor scales), bit for bit;
    # XLA's formula up to the rounding of its float32 sum.
    reference = matmul.quantize_weight(WeightQuantizer("ternary", 1.58, granularity, group_size),
                                       jnp.asarray(kernel_IxO))
    assert codes_OxI.dtype == np.int8 and codes_OxI.shape == (10, 24)
    np.testing.assert_array_equal(codes_OxI, np.asarray(reference.codes).T)
    np.testing.assert_array_equal(gamma, np.asarray(reference.scale))
    formula = quant.ternary_absmean(jnp.asarray(kernel_IxO), granularity, group_size)
    np.testing.assert_allclose(gamma, np.asarray(formula.scale), rtol=1e-6)
    for layout in packing.LAYOUTS:
        packed = codec.pack_codes(codes_OxI, layout)
        assert packed.dtype == np.uint8 and packed.shape == codec.packed_shape((10, 24), layout)
        np.testing.assert_array_equal(codec.unpack_codes(packed, (10, 24), layout), codes_OxI)
    latent = codec.exact_latent(codes_OxI.T, gamma, granularity, group_size)
    again = quant.ternary_absmean(jnp.asarray(latent), granularity, group_size)
    np.testing.assert_array_equal(np.asarray(again.codes).T, codes_OxI)
    np.testing.assert_array_equal(np.asarray(again.scale), gamma)


def test_torch_codes_keeps_numpy_and_jax_apart():
    codes_IxO = np.array([[1, 0, -1], [0, 1, 1]], np.float32)
    as_numpy = codec.torch_codes(codes_IxO)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.int8
    np.testing.assert_array_equal(as_numpy, codes_IxO.T)
    as_jax = jax.jit(codec.torch_codes)(jnp.asarray(codes_IxO))
    assert isinstance(as_jax, jax.Array) and as_jax.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(as_jax), codes_IxO.T)
