"""The ternary weight quantization kernel (bitnet_jax.core.cpu_ternary): gamma is the float64
sum of |W| rounded to float32 times the float32 reciprocal of the size (XLA's compiled mean), the codes are quant.ternary_absmean's formula for that gamma
bit for bit (ties, the 1e-5 floor, tails, several blocks), under vmap and on a sharded mesh, and
the quantized matmul takes it on CPUs for per-tensor ternary weights and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import codec, cpu_int8, cpu_ternary, matmul, quant
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer

pytestmark = pytest.mark.skipif(not cpu_ternary.available(),
                                reason=f"CPU kernels unavailable: {cpu_int8.unavailable_reason()}")

TERNARY = WeightQuantizer("ternary", 1.58)
A8 = ActivationQuantizer("absmax", 8)
_kernel = jax.jit(cpu_ternary.ternary_absmean)


def _weight(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, shape).astype(np.float32)
    w.flat[::7] *= 30  # a heavy tail: codes of both signs clip, small ones round to 0
    return w


def _formula_codes(w, gamma):
    return np.clip(np.round(w * (np.float32(1.0) / np.float32(gamma))), -1, 1).astype(np.int8)


# One element, tails of the 16-lane loops, and weights of several 65536-element blocks.
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (16, 64), (17, 1000), (300, 300),
                                   (257, 1031)])
def test_gamma_is_the_rounded_float64_sum_over_n_and_codes_the_formula(shape):
    w = _weight(shape, seed=shape[0] * 7 + shape[1])
    q = _kernel(jnp.asarray(w))
    assert q.codes.dtype == jnp.int8 and q.codes.shape == shape
    assert q.scale.dtype == jnp.float32 and q.scale.shape == ()
    want_gamma = np.float32(np.abs(w.astype(np.float64)).sum()) * (np.float32(1) / w.size)
    assert np.asarray(q.scale) == want_gamma
    np.testing.assert_array_equal(np.asarray(q.codes), _formula_codes(w, want_gamma))
    # XLA's float32 sum runs in an order of its own: the same gamma up to its last bits.
    xla = quant.ternary_absmean(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(q.scale), np.asarray(xla.scale), rtol=1e-6)


def test_ties_round_half_to_even_and_codes_clip():
    # mean|W| = 2 / 8 = 0.25 exactly, so W / gamma = 0.5, -0.5, 1.5, -1.5, 2.5, -1, 0, 0.5.
    w = np.array([[0.125, -0.125, 0.375, -0.375], [0.625, -0.25, 0.0, 0.125]], np.float32)
    q = _kernel(jnp.asarray(w))
    assert float(q.scale) == 0.25
    np.testing.assert_array_equal(np.asarray(q.codes), [[0, 0, 1, -1], [1, -1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(q.codes),
                                  np.asarray(quant.ternary_absmean(jnp.asarray(w)).codes))


@pytest.mark.parametrize("value", [0.0, 1e-7])
def test_weights_below_the_floor_take_gamma_1e_5(value):
    q = _kernel(jnp.full((8, 24), value, jnp.float32))
    assert np.asarray(q.scale) == np.float32(1e-5)
    np.testing.assert_array_equal(np.asarray(q.codes), np.zeros((8, 24), np.int8))


def test_vmap_quantizes_each_weight_with_its_own_gamma():
    ws = jnp.asarray(np.stack([_weight((40, 24), seed=s) * (s + 1) for s in range(3)]))
    got = jax.jit(jax.vmap(cpu_ternary.ternary_absmean))(ws)
    for i in range(3):
        one = _kernel(ws[i])
        assert np.asarray(got.scale[i]) == np.asarray(one.scale)
        np.testing.assert_array_equal(np.asarray(got.codes[i]), np.asarray(one.codes))


def test_what_the_kernel_takes():
    w = jnp.zeros((4, 8), jnp.float32)
    assert cpu_ternary.applies(TERNARY, w)
    assert not cpu_ternary.applies(WeightQuantizer("ternary", 1.58, "channel"), w)
    assert not cpu_ternary.applies(WeightQuantizer("binary", 1), w)
    assert not cpu_ternary.applies(WeightQuantizer("absmax", 4), w)
    assert not cpu_ternary.applies(None, w)
    assert not cpu_ternary.applies(TERNARY, w.astype(jnp.bfloat16))
    assert not cpu_ternary.applies(TERNARY, jnp.zeros((2, 4, 8), jnp.float32))
    with pytest.raises(ValueError, match="float32 2-D"):
        cpu_ternary.ternary_absmean(w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="float32 2-D"):
        cpu_ternary.ternary_absmean(jnp.zeros((8,), jnp.float32))


def _grad_fn(qx, qw, integer=False):
    def loss(x, w):
        y = matmul.quantized_dot(x, w, qx, qw, jnp.bfloat16, integer)
        return jnp.sum(y.astype(jnp.float32) ** 2), y
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("qx,qw,takes", [
    (A8, TERNARY, True), (None, TERNARY, True),
    (A8, WeightQuantizer("ternary", 1.58, "channel"), False),
    (A8, WeightQuantizer("absmax", 4), False)], ids=["b1.58", "w1.58a16", "channel", "w4"])
def test_the_cpu_step_takes_the_kernel_for_per_tensor_ternary_weights(qx, qw, takes):
    x = jnp.asarray(np.random.default_rng(1).standard_t(3, (2, 40, 64)), jnp.bfloat16)
    w = jnp.asarray(_weight((64, 48), seed=2))
    hlo = _grad_fn(qx, qw).lower(x, w).as_text()
    assert (cpu_int8.TERNARY_ABSMEAN_TARGET in hlo) == takes


def test_fake_and_integer_paths_share_the_kernels_gamma(monkeypatch):
    """With the kernel the fake-quantized and integer paths still agree bit for bit; on weights
    whose float32 sums are exact (`codec.exact_latent`'s) the step is XLA's bit for bit."""
    x = jnp.asarray(np.random.default_rng(3).standard_t(3, (2, 40, 64)), jnp.bfloat16)
    codes = np.random.default_rng(4).integers(-1, 2, (64, 48)).astype(np.int8)
    w = jnp.asarray(codec.exact_latent(codes, np.float32(0.0173)))
    assert np.asarray(_kernel(w).scale) == np.asarray(quant.ternary_absmean(w).scale)
    (dx, dw), y = _grad_fn(A8, TERNARY)(x, w)
    (dx_int, dw_int), y_int = _grad_fn(A8, TERNARY, integer=True)(x, w)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_int, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_int, np.float32))
    monkeypatch.setattr(cpu_ternary, "applies", lambda *args: False)
    (dx_xla, dw_xla), y_xla = _grad_fn(A8, TERNARY)(x, w)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_xla, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_xla, np.float32))
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw_xla))


@pytest.mark.parametrize("spec", [(None, "tensor"), ("tensor", None), (None, None)],
                         ids=["columns", "rows", "replicated"])
def test_sharded_weights_are_not_gathered(spec):
    """A tensor-parallel weight is quantized on its shards (one psum of |W|'s sums, no
    all-gather), a replicated one by the kernel on every device; the codes are the
    single-device ones and gamma agrees to float32 rounding."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    w = _weight((64, 96), seed=5)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    ws = jax.device_put(w, sharding)
    fn = jax.jit(cpu_ternary.ternary_absmean)
    hlo = fn.lower(ws).compile().as_text()
    assert "all-gather" not in hlo
    assert (cpu_int8.TERNARY_ABSMEAN_TARGET in hlo) == (spec == (None, None))
    got, want = fn(ws), _kernel(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.codes), _formula_codes(w, got.scale))
    assert got.codes.sharding.is_equivalent_to(sharding, 2)
