"""`order_statistics.kth_largest` is `lax.top_k`'s k-th value bit for bit, without its sort on CPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core.order_statistics import kth_largest

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def awkward_rows(dtype, rows=64, n=37, seed=0):
    """Rows with what orders badly: both signs over many decades, ties (rows of one value,
    repeated values), +0 and -0, subnormals, infinities of both signs, the largest finite value,
    and NaN of both signs."""
    rng = np.random.default_rng(seed)
    info = np.finfo(np.float32) if dtype == jnp.bfloat16 else np.finfo(dtype)
    decades = 4 if dtype == jnp.float16 else 30
    x = rng.normal(size=(rows, n)) * 10.0 ** rng.integers(-decades, decades, (rows, 1))
    x[1] = 0.0
    x[2] = -3.0
    x[3, ::2] = 1.5
    x[4, :5], x[4, 5:8] = np.inf, -np.inf
    x[5, 3], x[5, 4] = float(info.max) / 4, -float(info.max) / 4
    x[6, :10] = float(info.tiny) / 8  # subnormal
    x[7, 7] = np.nan
    x[8, ::3] = -np.nan
    x[9, ::2] = -0.0
    x[10] = np.where(np.arange(n) % 2, 0.0, -0.0)
    return jnp.asarray(x, dtype)


def _bits(a):
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", ["signed", "magnitudes"])
def test_kth_largest_is_top_ks_value_bit_for_bit(dtype, sign):
    """From the largest to the smallest: XLA's TopK orders by IEEE total order (-0 below +0, NaN
    above infinity, -NaN below it), and so does the bisection."""
    x = awkward_rows(dtype)
    if sign == "magnitudes":
        x = jnp.abs(x)
    bisection = jax.jit(kth_largest, static_argnums=1)
    top_k = jax.jit(lambda v, k: jax.lax.top_k(v, k)[0][..., -1:], static_argnums=1)
    if jax.default_backend() == "cpu":  # no sort on a CPU (elsewhere: lax.top_k itself)
        compiled = bisection.lower(x, 5).compile().as_text()
        assert "topk" not in compiled.lower() and " sort(" not in compiled
    for k in (1, 2, 9, 18, 19, 36, 37):
        got, want = bisection(x, k), top_k(x, k)
        assert got.shape == (x.shape[0], 1) and got.dtype == x.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"k={k}")
        rows = ~np.isnan(np.asarray(x, np.float32)).any(axis=-1)  # numpy's sort, without NaN
        np.testing.assert_array_equal(np.asarray(got, np.float32)[rows, 0],
                                      -np.sort(-np.asarray(x, np.float32)[rows], axis=-1)[:, k - 1])


def test_on_leading_axes_and_a_sharded_batch():
    x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 6, 40)), jnp.bfloat16)
    want = jax.lax.top_k(x, 13)[0][..., -1:]
    fn = jax.jit(kth_largest, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(fn(x, 13)), np.asarray(want))
    devices = jax.devices()
    if len(devices) < 4:
        return
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("data",))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert "all-gather" not in fn.lower(xs, 13).compile().as_text()
    np.testing.assert_array_equal(np.asarray(fn(xs, 13)), np.asarray(want))


def test_integers_and_a_k_out_of_range():
    x = jnp.asarray([[3, -1, 7, 7, 0]], jnp.int32)
    assert int(kth_largest(x, 3)[0, 0]) == 3
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest(x, 6)
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest(x, 0)
