"""`order_statistics.kth_largest` is `lax.top_k`'s k-th value bit for bit, without its sort on
CPUs: by XLA's bisection and by our kernel's (`cpu_order_statistics`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_order_statistics
from bitnet_jax.core.order_statistics import kth_largest, smallest_with_mass_above_below
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


@pytest.fixture(params=["kernel", "xla-bisection"])
def cpu_path(request, monkeypatch):
    """Each test on CPUs twice: through our kernel, and through XLA's passes without it."""
    if request.param == "kernel":
        if not cpu_order_statistics.available():
            pytest.skip("the CPU kernels are not available here")
    else:
        monkeypatch.setattr(cpu_order_statistics, "applies", lambda values: False)
    jax.clear_caches()  # traces of `kth_largest` made on the other path
    yield request.param
    jax.clear_caches()


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
def test_kth_largest_is_top_ks_value_bit_for_bit(dtype, sign, cpu_path):
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
        assert ("bitnet_kth_largest" in compiled) == (cpu_path == "kernel")
    for k in (1, 2, 9, 18, 19, 36, 37):
        got, want = bisection(x, k), top_k(x, k)
        assert got.shape == (x.shape[0], 1) and got.dtype == x.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"k={k}")
        rows = ~np.isnan(np.asarray(x, np.float32)).any(axis=-1)  # numpy's sort, without NaN
        np.testing.assert_array_equal(np.asarray(got, np.float32)[rows, 0],
                                      -np.sort(-np.asarray(x, np.float32)[rows], axis=-1)[:, k - 1])


@pytest.mark.parametrize("dtype, rows, n", [(jnp.bfloat16, 3, 4099), (jnp.float32, 3, 32003),
                                            (jnp.float16, 1000, 37)])
def test_long_rows_their_tails_and_many_rows(dtype, rows, n, cpu_path):
    """Rows of many vector widths and a tail (the kernel takes 32 or 16 keys at a time), a
    vocabulary's worth of logits as top-k sampling ranks them, and many short rows (the kernel
    gives a task several rows, the last task fewer)."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(rows, n)), dtype)
    for k in (1, 20, n // 2, n - 1, n):
        np.testing.assert_array_equal(_bits(jax.jit(kth_largest, static_argnums=1)(x, k)),
                                      _bits(jax.lax.top_k(x, k)[0][..., -1:]), err_msg=f"k={k}")


def test_under_vmap_and_without_rows(cpu_path):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 5, 24)), jnp.bfloat16)
    got = jax.jit(jax.vmap(lambda row: kth_largest(row, 7)))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, 7)[0][..., -1:]))
    assert kth_largest(jnp.zeros((0, 24), jnp.float32), 3).shape == (0, 1)


def test_on_leading_axes_and_a_sharded_batch(cpu_path):
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


def test_mass_threshold_on_leading_axes_without_a_sort():
    """Values 4 > 3 > 2 = 2 > 1 weighing 1/8, 1/4, 1/8 and 1/4, 1/4 (sums exact): above 3 lies
    1/8, above 2 3/8, above 1 3/4; the threshold is the smallest value with less than `mass`
    above it, strictly less."""
    values = jnp.asarray([[[2.0, 4.0, 1.0, 3.0, 2.0]]] * 2, jnp.float32)
    weights = jnp.asarray([[[0.125, 0.125, 0.25, 0.25, 0.25]]] * 2, jnp.float32)
    fn = jax.jit(smallest_with_mass_above_below)
    for mass, want in [(0.125, 4.0), (0.2, 3.0), (0.375, 3.0), (0.5, 2.0), (0.75, 2.0),
                       (0.8, 1.0), (1.0, 1.0)]:
        got = fn(values, weights, mass)
        assert got.shape == (2, 1, 1)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"mass={mass}")
    compiled = fn.lower(values, weights, 0.5).compile().as_text()
    assert " sort(" not in compiled and "topk" not in compiled.lower()
    # a row without weight gives its largest value; mass above the row's weight is capped
    np.testing.assert_array_equal(np.asarray(fn(values, jnp.zeros_like(weights), 0.5)), 4.0)
    np.testing.assert_array_equal(np.asarray(fn(values, weights * 0.5, 0.8)), 1.0)
    with pytest.raises(ValueError, match="mass must be > 0"):
        smallest_with_mass_above_below(values, weights, np.float32(0.0))
    with pytest.raises(TypeError, match="floating point"):
        smallest_with_mass_above_below(values.astype(jnp.int32), weights, 0.5)


def test_a48_gradients_are_the_same_bits_through_the_kernel_and_xla(monkeypatch):
    """End to end: a4.8's TopK threshold (`quant.topk_per_token`) in a bf16 model's loss and
    gradient, through our kernel and through XLA's passes."""
    if not cpu_order_statistics.available():
        pytest.skip("the CPU kernels are not available here")
    config = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, d_ff=128,
                         max_seq_len=32, dtype="bfloat16", ffn_activation="relu2")
    model = Transformer(config, get_recipe("a4.8"))
    params = init_params(config, get_recipe("a4.8"), jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 64)

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    def run():
        jax.clear_caches()
        program = jax.jit(jax.value_and_grad(loss))
        return program.lower(params).compile().as_text(), program(params)

    kernel_program, kernel = run()
    monkeypatch.setattr(cpu_order_statistics, "applies", lambda values: False)
    xla_program, xla = run()
    assert "bitnet_kth_largest" in kernel_program and "bitnet_kth_largest" not in xla_program
    for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(xla)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.clear_caches()
