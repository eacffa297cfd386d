"""The weight gradient's X^T G on AMX tiles or AVX512-BF16 vectors (`cpu_weight_gradient`,
`kernels/weight_gradient.cc`): within float32 rounding of a float64 product on every shape
(each tail of the tiles; on vectors also XLA's bits), equal to XLA's dot bit for bit at training
shapes, NaN and infinities carried as XLA carries them, under vmap and partitioned on a mesh
without gathering its operands; the product with x's per-row quantization built in equals our
X_q^T and that product bit for bit; refusals. Runs where the CPU has AMX or AVX512-BF16 (the
`bf16_kernels` fixture skips elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_int8, cpu_int8_fused, cpu_weight_gradient
from bitnet_jax.core.quant import absmax_row_parameters, absmean_row_parameters


def _xla(a, g):
    return jax.lax.dot_general(a, g, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _operands(p, m, n, seed):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_t(3, (p, m)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(0, 1e-3, (m, n)), jnp.bfloat16)
    return a, g


def _f64(a):
    return np.asarray(a, np.float64)


P = jax.sharding.PartitionSpec


def _mesh_put():
    """`put(array, spec)` onto a 4 x 2 (fsdp, tensor) mesh of the simulated devices."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    return lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))


def _assert_partitioned(fn, args, want, target):
    """fn on the sharded args calls `target` on local shards, gathers no operand, and gives the
    single-device result up to the order of the psum's additions."""
    hlo = fn.lower(*args).compile().as_text()
    assert "all-gather" not in hlo and target in hlo
    np.testing.assert_allclose(np.asarray(fn(*args)), want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())


# One element; a tile and its tails in P (16 rows, 32-row blocks), M (32 per step, 256 per
# chunk) and N (16 columns, 32-column blocks); several chunks; blocks of out past the first
# task's (P and N past 512); M past XLA's blocks on vectors (2048, or 4096 for at most 16
# columns), even (where the tasks split m at the blocks: two and three of them), odd, and odd
# with its last row alone in a chunk (`kernels/kernel_util.h`, VectorSumBlock).
SHAPES = [(1, 1, 1), (3, 5, 7), (16, 32, 16), (17, 33, 15), (33, 70, 45), (64, 257, 96),
          (100, 600, 130), (40, 64, 700), (700, 96, 40), (33, 4096, 45), (40, 6144, 20),
          (40, 6145, 20), (20, 2049, 33), (17, 2305, 16), (16, 8192, 8), (16, 8193, 8)]


@pytest.mark.parametrize("p,m,n", SHAPES)
def test_within_float32_rounding_of_the_exact_product(p, m, n, bf16_kernels):
    a, g = _operands(p, m, n, seed=p + m + n)
    got = np.asarray(jax.jit(cpu_weight_gradient.weight_gradient_dot)(a, g))
    assert got.dtype == np.float32 and got.shape == (p, n)
    exact = _f64(a) @ _f64(g)
    bound = np.abs(_f64(a)) @ np.abs(_f64(g))
    # m additions in float32 (2^-24 each, relative to the running sum of magnitudes)
    np.testing.assert_array_less(np.abs(got - exact), (m + 1) * 2.0 ** -24 * bound + 1e-30)
    if cpu_int8.bf16_products() == "vectors":  # and every tail in XLA's order (AVX512-BF16)
        np.testing.assert_array_equal(got, np.asarray(jax.jit(_xla)(a, g)))


@pytest.mark.parametrize("p,m,n", [(256, 1024, 704), (160, 4096, 448), (704, 512, 256)])
def test_equals_xla_dot_bit_for_bit_at_training_shapes(p, m, n, bf16_kernels):
    """The sums run in m's order in one accumulator per output, as XLA:CPU's own product runs
    them on this CPU: why the training step's gradients do not move when the kernel takes dW."""
    a, g = _operands(p, m, n, seed=7)
    np.testing.assert_array_equal(np.asarray(cpu_weight_gradient.weight_gradient_dot(a, g)),
                                  np.asarray(jax.jit(_xla)(a, g)))


def test_nan_and_infinity_reach_the_outputs_they_touch(bf16_kernels):
    a, g = _operands(40, 70, 50, seed=3)
    g = g.at[5, 7].set(jnp.nan).at[9, 11].set(jnp.inf)
    got = np.asarray(cpu_weight_gradient.weight_gradient_dot(a, g))
    want = np.asarray(jax.jit(_xla)(a, g))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[:, 7]).all() and not np.isnan(np.delete(got, [7, 11], axis=1)).any()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_empty_contraction_gives_zeros_and_g_may_have_leading_axes(bf16_kernels):
    out = cpu_weight_gradient.weight_gradient_dot(jnp.zeros((5, 0), jnp.bfloat16),
                                                  jnp.zeros((0, 3), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), np.zeros((5, 3), np.float32))
    a, g = _operands(24, 2 * 48, 40, seed=4)
    np.testing.assert_array_equal(
        np.asarray(cpu_weight_gradient.weight_gradient_dot(a, g.reshape(2, 48, 40))),
        np.asarray(cpu_weight_gradient.weight_gradient_dot(a, g)))


def test_under_vmap(bf16_kernels):
    a, g = _operands(24, 64, 40, seed=5)
    a2 = jnp.stack([a, -a])
    got = jax.vmap(cpu_weight_gradient.weight_gradient_dot, in_axes=(0, None))(a2, g)
    np.testing.assert_array_equal(np.asarray(got[1]),
                                  np.asarray(cpu_weight_gradient.weight_gradient_dot(-a, g)))


def test_partitioned_without_gathering_its_operands(bf16_kernels):
    """Data parallel (the tokens split: a psum of local products) and tensor parallel (x_t's
    rows and g's columns split): no all-gather, the single-device result up to the order of
    the psum's additions."""
    put = _mesh_put()
    a, g = _operands(64, 256, 96, seed=6)
    want = np.asarray(cpu_weight_gradient.weight_gradient_dot(a, g))
    fn = jax.jit(cpu_weight_gradient.weight_gradient_dot)
    for a_spec, g_spec in [(P(None, "fsdp"), P("fsdp", None)), (P("tensor", "fsdp"),
                                                                P("fsdp", None)),
                           (P(None, "fsdp"), P("fsdp", "tensor"))]:
        _assert_partitioned(fn, (put(a, a_spec), put(g, g_spec)), want,
                            cpu_int8.WEIGHT_GRADIENT_DOT_TARGET)


def test_refusals(bf16_kernels):
    a, g = _operands(8, 16, 4, seed=1)
    with pytest.raises(TypeError, match="bf16"):
        cpu_weight_gradient.weight_gradient_dot(a.astype(jnp.float32), g)
    with pytest.raises(ValueError, match="want x_t"):
        cpu_weight_gradient.weight_gradient_dot(a, g[:15])
    bf16_kernels()
    assert not cpu_weight_gradient.available()
    with pytest.raises(RuntimeError, match="AMX"):
        cpu_weight_gradient.weight_gradient_dot(a, g)


def _row_quantized(m, p, bits, kind, seed):
    """bf16 x (m, p) with a zero row, and its per-row multiplier and scale as `quant` makes them."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_t(3, (m, p)), jnp.bfloat16).at[min(2, m - 1)].set(0)
    if kind == "absmax":
        mult, scale = absmax_row_parameters(x.astype(jnp.float32), 2 ** (bits - 1) - 1, 1e-5)
    else:
        mult, scale = absmean_row_parameters(x.astype(jnp.float32), bits)
    return x, mult[..., 0], scale[..., 0]


@pytest.mark.parametrize("m,p,n", [(1, 1, 1), (5, 3, 7), (32, 16, 16), (70, 33, 45),
                                   (257, 100, 130), (600, 64, 40), (96, 700, 40),
                                   (4096, 33, 20), (4097, 33, 20)])
@pytest.mark.parametrize("bits,kind", [(8, "absmax"), (4, "absmean")])
def test_quantized_equals_our_x_q_transposed_then_the_product(m, p, n, bits, kind, bf16_kernels):
    """X_q^T built in L1 from x and its row parameters: the values `quantize_transpose` writes,
    so the same product bit for bit (tails of 16 p, 32 m and both tile blocks; a zero row)."""
    x, mult, scale = _row_quantized(m, p, bits, kind, seed=m + p)
    g = jnp.asarray(np.random.default_rng(n).normal(0, 1e-3, (m, n)), jnp.bfloat16)
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    got = jax.jit(lambda *a: cpu_weight_gradient.quantized_weight_gradient(*a, lo, hi))(
        x, mult, scale, g)
    x_q_t = cpu_int8_fused.quantize_transpose(x, mult, scale, lo, hi)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(cpu_weight_gradient.weight_gradient_dot(x_q_t, g)))


def test_quantized_takes_leading_axes_vmap_and_a_mesh(bf16_kernels):
    x, mult, scale = _row_quantized(256, 64, 8, "absmax", seed=11)
    g = jnp.asarray(np.random.default_rng(12).normal(0, 1e-3, (256, 96)), jnp.bfloat16)
    fn = jax.jit(lambda *a: cpu_weight_gradient.quantized_weight_gradient(*a, -128, 127))
    want = np.asarray(fn(x, mult, scale, g))
    lead = lambda a: a.reshape(4, 64, *a.shape[1:])  # noqa: E731
    np.testing.assert_array_equal(np.asarray(fn(lead(x), lead(mult), lead(scale), lead(g))),
                                  want)
    got = jax.vmap(fn, in_axes=(None, None, None, 0))(x, mult, scale, jnp.stack([g, -g]))
    np.testing.assert_array_equal(np.asarray(got[0]), want)
    put = _mesh_put()
    for x_spec, g_spec in [(P("fsdp", None), P("fsdp", None)), (P("fsdp", "tensor"),
                                                                P("fsdp", None)),
                           (P("fsdp", None), P("fsdp", "tensor"))]:
        args = (put(x, x_spec), put(mult, P("fsdp")), put(scale, P("fsdp")), put(g, g_spec))
        _assert_partitioned(fn, args, want, cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET)


def test_quantized_refusals(bf16_kernels):
    x, mult, scale = _row_quantized(8, 16, 8, "absmax", seed=1)
    g = jnp.zeros((8, 4), jnp.bfloat16)
    with pytest.raises(TypeError, match="bf16"):
        cpu_weight_gradient.quantized_weight_gradient(x, mult, scale, g.astype(jnp.float32),
                                                      -128, 127)
    with pytest.raises(ValueError, match="leading axes"):
        cpu_weight_gradient.quantized_weight_gradient(x, mult, scale, g[:7], -128, 127)
    bf16_kernels()
    with pytest.raises(RuntimeError, match="AMX"):
        cpu_weight_gradient.quantized_weight_gradient(x, mult, scale, g, -128, 127)
