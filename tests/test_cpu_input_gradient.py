"""The exact input gradient's g W_q^T on AMX tiles or AVX512-BF16 vectors (`cpu_input_gradient`,
`kernels/input_gradient.cc`): bit for bit XLA's dot of g and the dequantized weights rounded to
bf16, on every shape (each tail of the tiles and panels) and at training shapes, with one weight
scale per tensor or per output feature; within bf16 rounding of a float64 product; NaN and
infinities carried as XLA carries them; leading axes, vmap and a mesh; refusals. Runs where the
CPU has AMX or AVX512-BF16 (the `bf16_kernels` fixture skips elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_input_gradient, cpu_int8

P = jax.sharding.PartitionSpec


def _xla(g, codes, scale):
    """What the quantized matmul's backward computes without the kernel."""
    w = (codes.astype(jnp.float32) * scale).astype(jnp.bfloat16)
    return jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _operands(m, n, k, seed, per_feature=False):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.standard_t(3, (m, n)) * 1e-3, jnp.bfloat16)
    codes = jnp.asarray(rng.integers(-1, 2, (k, n)), jnp.int8)
    scale = (jnp.asarray(rng.lognormal(-3, 0.5, n), jnp.float32) if per_feature
             else jnp.float32(0.0213))
    return g, codes, scale


def _bits(a):
    return np.asarray(a).view(np.uint16)


# One element; a 16-row tile and its tails; N not a multiple of 32 (rows staged) and a multiple
# (read in place) with a row tail; K across 64-column panels and their tails; tasks past the
# first (M past 64); the ladder presets' shapes; N past XLA's blocks on vectors (2048, or 4096
# for at most 16 columns), even and odd (`kernels/kernel_util.h`, VectorSumBlock).
PAST_VECTOR_BLOCKS = [(40, 4096, 70), (23, 6145, 33), (9, 2051, 64), (9, 8193, 16)]
SHAPES = [(1, 1, 1), (5, 33, 1), (16, 32, 64), (17, 50, 70), (37, 64, 65), (100, 96, 130),
          (200, 31, 300), (4096, 160, 448), (1024, 704, 256), (512, 1376, 512),
          *PAST_VECTOR_BLOCKS]


@pytest.mark.parametrize("per_feature", [False, True], ids=["per-tensor", "per-feature"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_equals_xla_bit_for_bit(m, n, k, per_feature, bf16_kernels):
    """The sums run in n's order in one accumulator per output, as XLA:CPU's own product runs
    them on this CPU, and round to bf16 as its conversion does: why the training step's
    gradients do not move when the kernel takes dx."""
    g, codes, scale = _operands(m, n, k, seed=m + n + k, per_feature=per_feature)
    got = jax.jit(cpu_input_gradient.codes_input_gradient)(g, codes, scale)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, k)
    # Contractions past 2048 were probed against XLA's own order on vectors only (the tiles'
    # kernel sums them in one run; XLA's AMX product at such N is untested): the bound below.
    if (m, n, k) not in PAST_VECTOR_BLOCKS or cpu_int8.bf16_products() == "vectors":
        np.testing.assert_array_equal(_bits(got), _bits(jax.jit(_xla)(g, codes, scale)))
    w = np.asarray((codes.astype(jnp.float32) * scale).astype(jnp.bfloat16), np.float64)
    exact = np.asarray(g, np.float64) @ w.T
    bound = np.abs(np.asarray(g, np.float64)) @ np.abs(w).T
    # n float32 additions, then one bf16 rounding (2^-9 of the result)
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - exact),
                                 (n + 1) * 2.0 ** -24 * bound + 2.0 ** -8 * np.abs(exact)
                                 + 1e-30)


def test_nan_and_infinity_reach_the_outputs_they_touch(bf16_kernels):
    g, codes, scale = _operands(40, 70, 50, seed=3)
    g = g.at[5, 7].set(jnp.nan).at[9, 11].set(jnp.inf)
    got = np.asarray(cpu_input_gradient.codes_input_gradient(g, codes, scale), np.float32)
    want = np.asarray(jax.jit(_xla)(g, codes, scale), np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[5]).any() and not np.isnan(np.delete(got, [5, 9], axis=0)).any()
    np.testing.assert_array_equal(got[np.isfinite(want)], want[np.isfinite(want)])


def test_leading_axes_an_empty_contraction_and_vmap(bf16_kernels):
    g, codes, scale = _operands(2 * 48, 64, 40, seed=4)
    flat = cpu_input_gradient.codes_input_gradient(g, codes, scale)
    np.testing.assert_array_equal(
        _bits(cpu_input_gradient.codes_input_gradient(g.reshape(2, 48, 64), codes, scale)),
        _bits(flat.reshape(2, 48, 40)))
    empty = cpu_input_gradient.codes_input_gradient(jnp.zeros((5, 0), jnp.bfloat16),
                                                    jnp.zeros((3, 0), jnp.int8), scale)
    np.testing.assert_array_equal(np.asarray(empty, np.float32), np.zeros((5, 3), np.float32))
    got = jax.vmap(cpu_input_gradient.codes_input_gradient, in_axes=(0, None, None))(
        jnp.stack([g, -g]), codes, scale)
    np.testing.assert_array_equal(_bits(got[1]), _bits(jax.jit(_xla)(-g, codes, scale)))


def test_partitioned_on_a_mesh_as_on_one_device(bf16_kernels):
    """Data parallel (g's rows split: local products, nothing gathered), the weights' rows
    split (dx's columns), and the contraction split (gathered, so that no device's sums are
    rounded before the sum): each the single-device bits."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))

    def put(a, spec):
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))

    g, codes, scale = _operands(256, 96, 64, seed=6, per_feature=True)
    want = _bits(cpu_input_gradient.codes_input_gradient(g, codes, scale))
    fn = jax.jit(cpu_input_gradient.codes_input_gradient)
    for g_spec, codes_spec, gathers in [(P("fsdp", None), P(None, None), False),
                                        (P("fsdp", None), P("tensor", None), False),
                                        (P("fsdp", "tensor"), P(None, "tensor"), True)]:
        args = (put(g, g_spec), put(codes, codes_spec), scale)
        hlo = fn.lower(*args).compile().as_text()
        assert cpu_int8.CODES_INPUT_GRADIENT_TARGET in hlo
        assert ("all-gather" in hlo) == gathers
        np.testing.assert_array_equal(_bits(fn(*args)), want)


def test_refusals(bf16_kernels):
    g, codes, scale = _operands(8, 16, 4, seed=1)
    with pytest.raises(TypeError, match="bf16 g and int8 codes"):
        cpu_input_gradient.codes_input_gradient(g.astype(jnp.float32), codes, scale)
    with pytest.raises(ValueError, match="want g"):
        cpu_input_gradient.codes_input_gradient(g[:, :15], codes, scale)
    with pytest.raises(ValueError, match="scale of 1 or N"):
        cpu_input_gradient.codes_input_gradient(g, codes, jnp.ones(3, jnp.float32))
    bf16_kernels()
    assert not cpu_input_gradient.available()
    with pytest.raises(RuntimeError, match="AMX"):
        cpu_input_gradient.codes_input_gradient(g, codes, scale)
