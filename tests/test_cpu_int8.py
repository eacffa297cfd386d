"""Exactness of the AVX512-VNNI int8 FFI kernel (bitnet_jax.core.cpu_int8) against XLA's int8 dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_int8

pytestmark = pytest.mark.skipif(not cpu_int8.available(),
                                reason=f"VNNI int8 kernel unavailable: "
                                       f"{cpu_int8.unavailable_reason()}")


def _ref(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)


def _rand(rng, shape, low=-128, high=128):
    return jnp.asarray(rng.integers(low, high, shape, dtype=np.int8))


def _check(x, w, fn=cpu_int8.int8_dot):
    got = np.asarray(fn(x, w))
    want = np.asarray(_ref(x, w))
    assert got.dtype == np.int32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [1, 5, 100])
@pytest.mark.parametrize("n", [1, 15, 33])
def test_odd_sizes(m, k, n):
    rng = np.random.default_rng(m * 10007 + k * 101 + n)
    _check(_rand(rng, (m, k)), _rand(rng, (n, k)))


# Both code paths (direct: few rows; packed: many rows) and their tails: rows not a multiple of
# the 6-row micro-tile, columns not a multiple of the 64-column panel, K not a multiple of 4/64.
@pytest.mark.parametrize("m,k,n", [
    (16, 64, 64), (18, 64, 64), (19, 131, 130), (37, 250, 200), (100, 67, 257),
    (40, 1024, 4100),     # direct path for M <= 64 with big weights
    (70, 1024, 4100),     # packed path, big weights
    (6, 2560, 640), (256, 1376, 512),
])
def test_paths_and_tails(m, k, n):
    rng = np.random.default_rng(m + k + n)
    _check(_rand(rng, (m, k)), _rand(rng, (n, k)))


@pytest.mark.parametrize("m,k,n", [(4096, 512, 1376), (4096, 1376, 512), (4096, 512, 512),
                                   (4096, 256, 704), (2, 2560, 6912), (16, 2560, 6912)])
def test_training_and_decode_shapes(m, k, n):
    rng = np.random.default_rng(0)
    _check(_rand(rng, (m, k)), _rand(rng, (n, k), -1, 2))  # ternary weights


@pytest.mark.parametrize("m,k,n", [(5, 130, 70), (64, 2048, 96)])
def test_extreme_values(m, k, n):
    for xv, wv in [(-128, -128), (-128, 127), (127, 127), (127, -128)]:
        x = jnp.full((m, k), xv, jnp.int8)
        w = jnp.full((n, k), wv, jnp.int8)
        _check(x, w)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.choice(np.array([-128, 127], np.int8), (m, k)))
    w = jnp.asarray(rng.choice(np.array([-128, 127], np.int8), (n, k)))
    _check(x, w)


def test_int32_wraparound_matches_xla():
    # 16384 * 131080 overflows int32: both must wrap identically (modulo 2^32).
    k = 131080
    x = jnp.full((2, k), -128, jnp.int8)
    w = jnp.full((3, k), -128, jnp.int8)
    _check(x, w)


def test_under_jit_with_leading_dims():
    rng = np.random.default_rng(2)
    x = _rand(rng, (2, 3, 7, 45))
    w = _rand(rng, (29, 45))
    f = jax.jit(cpu_int8.int8_dot)
    _check(x, w, f)
    _check(x[0, 0, 0], w, f)  # 1-D x -> (N,)

    @jax.jit
    def fused(x, w):  # the kernel inside a larger jitted computation
        y = cpu_int8.int8_dot(jnp.clip(x, -127, 127).astype(jnp.int8), w)
        return y.astype(jnp.float32) * 0.5

    got = np.asarray(fused(x, w))
    want = np.asarray(_ref(jnp.clip(x, -127, 127), w)).astype(np.float32) * 0.5
    np.testing.assert_array_equal(got, want)


def test_vmap():
    rng = np.random.default_rng(3)
    x = _rand(rng, (4, 9, 33))
    w = _rand(rng, (17, 33))
    ws = _rand(rng, (4, 17, 33))
    got = jax.jit(jax.vmap(cpu_int8.int8_dot, in_axes=(0, None)))(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ref(x, w)))
    got = jax.vmap(cpu_int8.int8_dot, in_axes=(1, None))(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ref(x, w)).transpose(1, 0, 2))
    got = jax.vmap(cpu_int8.int8_dot)(x, ws)  # batched weights: falls back to XLA
    want = np.stack([np.asarray(_ref(x[i], ws[i])) for i in range(4)])
    np.testing.assert_array_equal(np.asarray(got), want)
    got = jax.vmap(jax.vmap(cpu_int8.int8_dot, in_axes=(0, None)), in_axes=(None, 0))(x, ws)
    want = np.stack([np.asarray(_ref(x, ws[j])) for j in range(4)])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_int8_dot_or_xla_and_errors():
    rng = np.random.default_rng(4)
    x, w = _rand(rng, (3, 10)), _rand(rng, (4, 10))
    _check(x, w, cpu_int8.int8_dot_or_xla)
    with pytest.raises(TypeError):
        cpu_int8.int8_dot(x.astype(jnp.int32), w)
    with pytest.raises(ValueError):
        cpu_int8.int8_dot(x, w[:, :5])


@pytest.mark.parametrize("amx", [False, True])
def test_with_amx_xla_takes_the_products_of_many_rows(amx, monkeypatch):
    # On AMX-INT8 CPUs XLA's own int8 dot beats the VNNI kernel from a few dozen rows on; the
    # kernel keeps the few rows of decoding. Same numbers either way.
    from bitnet_jax.core import cpu_int8_fused, matmul
    from bitnet_jax.core.precision import A8, TERNARY

    monkeypatch.setattr(cpu_int8, "_has_amx_int8", lambda: amx)
    rng = np.random.default_rng(5)
    w = _rand(rng, (24, 40))
    for rows in (2, cpu_int8.XLA_INT8_MIN_ROWS_WITH_AMX - 1, cpu_int8.XLA_INT8_MIN_ROWS_WITH_AMX,
                 300):
        x = _rand(rng, (rows, 40))
        # A fresh function: jit's trace cache would keep the other case's choice.
        hlo = jax.jit(lambda a, b: cpu_int8.int8_dot_or_xla(a, b)).lower(x, w).as_text()
        xla = amx and rows >= cpu_int8.XLA_INT8_MIN_ROWS_WITH_AMX
        assert cpu_int8.xla_int8_is_faster(rows) == xla
        assert (cpu_int8.TARGET_NAME in hlo) == (not xla)
        _check(x, w, cpu_int8.int8_dot_or_xla)
    # The integer path's fused kernels (x quantized inside the product, and with the int8 input
    # gradient g too) step aside as well; X_q^T for the weight gradient stays a kernel (written,
    # or built inside the weight gradient's kernel where that runs).
    x = jnp.asarray(rng.normal(size=(4, 75, 40)), jnp.bfloat16)
    wf = jnp.asarray(rng.normal(size=(40, 24)) * 0.05, jnp.float32)
    loss = lambda xv, wv: jnp.sum(matmul.quantized_dot(  # noqa: E731
        xv, wv, A8, TERNARY, jnp.bfloat16, True, True).astype(jnp.float32))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, wf).as_text()
    if cpu_int8_fused.available():
        assert (cpu_int8_fused.ABSMAX_QUANT_DOT_TARGET in hlo) == (not amx)
        assert (cpu_int8_fused.QUANTIZE_TRANSPOSE_TARGET in hlo
                or cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET in hlo)
    assert cpu_int8.TARGET_NAME not in hlo  # the fused kernel's product, or XLA's dot


def test_amx_detection_reads_the_cpu_flags_and_the_switch(monkeypatch):
    monkeypatch.setattr(cpu_int8, "cpu_flags", lambda: {"avx512_vnni", "amx_int8"})
    for setting, want in ((None, True), ("1", True), ("0", False)):
        if setting is None:
            monkeypatch.delenv(cpu_int8.AMX_ENV, raising=False)
        else:
            monkeypatch.setenv(cpu_int8.AMX_ENV, setting)
        cpu_int8._has_amx_int8.cache_clear()
        assert cpu_int8._has_amx_int8() == want
    monkeypatch.setattr(cpu_int8, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.delenv(cpu_int8.AMX_ENV)
    cpu_int8._has_amx_int8.cache_clear()
    assert not cpu_int8._has_amx_int8()
    monkeypatch.undo()
    cpu_int8._has_amx_int8.cache_clear()


def test_sharded_input_under_jit_is_correct():
    # The custom call is opaque to GSPMD: operands are gathered and the product is computed
    # unpartitioned, but the result must still be exact.
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(5)
    x = jax.device_put(_rand(rng, (8 * len(devices), 40)), spec)
    w = _rand(rng, (24, 40))
    got = jax.jit(cpu_int8.int8_dot)(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ref(x, w)))


# ---------------------------------------------------------------------------------------------
# dequantize_transpose: the weight-gradient operand X_q^T, bit for bit as XLA computes it.


def _dequantize_transpose_ref(codes, scale):
    return (codes.astype(jnp.float32) * scale).astype(jnp.bfloat16).reshape(-1, codes.shape[-1]).T


def _check_dequantize_transpose(codes, scale, fn=cpu_int8.dequantize_transpose):
    got = fn(codes, scale)
    want = _dequantize_transpose_ref(codes, scale)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got.view(jnp.uint16)),
                                  np.asarray(want.view(jnp.uint16)))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 4), (15, 130), (33, 7), (2, 9, 70),
                                   (16, 256, 512), (4096, 1376)])
def test_dequantize_transpose_sizes(shape):
    rng = np.random.default_rng(sum(shape))
    codes = _rand(rng, shape)
    scale = jnp.asarray(rng.lognormal(-4, 2, (*shape[:-1], 1)), jnp.float32)
    _check_dequantize_transpose(codes, scale)
    _check_dequantize_transpose(codes, scale, jax.jit(cpu_int8.dequantize_transpose))


def test_dequantize_transpose_rounding_and_special_scales():
    rng = np.random.default_rng(6)
    codes = _rand(rng, (40, 24))
    # Scales whose products land on bf16 ties (1 + 2^-8 has a 9-bit mantissa), tiny, huge
    # (overflow to inf), zero, inf (0 * inf = NaN) and NaN.
    scale = np.full((40, 1), 1 + 2.0 ** -8, np.float32)
    scale[1], scale[2], scale[3] = 1e-40, 3e38, 0.0
    scale[4], scale[5] = np.inf, np.nan
    scale[6:] = rng.lognormal(0, 3, (34, 1))
    _check_dequantize_transpose(codes, jnp.asarray(scale))
    # A 1-D scale (one per row) is accepted too.
    got = cpu_int8.dequantize_transpose(codes, jnp.asarray(scale[:, 0]))
    want = _dequantize_transpose_ref(codes, jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(got.view(jnp.uint16)),
                                  np.asarray(want.view(jnp.uint16)))


def test_dequantize_transpose_vmap_and_errors():
    rng = np.random.default_rng(7)
    codes = _rand(rng, (3, 20, 12))
    scale = jnp.asarray(rng.random((3, 20, 1)), jnp.float32)
    got = jax.vmap(cpu_int8.dequantize_transpose)(codes, scale)
    want = np.stack([np.asarray(_dequantize_transpose_ref(codes[i], scale[i])) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.astype(np.float32))
    with pytest.raises(TypeError):
        cpu_int8.dequantize_transpose(codes.astype(jnp.int32), scale)
    with pytest.raises(ValueError, match="one scale per row"):
        cpu_int8.dequantize_transpose(codes, scale[:, :1])


# ---------------------------------------------------------------------------------------------
# GSPMD: the kernel runs on local shards of an fsdp x tensor mesh.


def _fsdp_tensor_mesh():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    return jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))


@pytest.mark.parametrize("x_spec, w_spec, out_spec", [
    (("fsdp", None), ("tensor", None), ("fsdp", "tensor")),  # batch x output features
    (("fsdp", "tensor"), (None, "tensor"), ("fsdp", None)),  # split contraction: psum
    (("fsdp", None), ("fsdp", None), ("fsdp", None)),  # one axis on both rows: w gathered
])
def test_partitioned_under_gspmd_equals_the_whole_product(x_spec, w_spec, out_spec):
    P = jax.sharding.PartitionSpec
    mesh = _fsdp_tensor_mesh()
    rng = np.random.default_rng(11)
    x, w = _rand(rng, (64, 48)), _rand(rng, (32, 48))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(*x_spec)))
    ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, P(*w_spec)))
    got = jax.jit(cpu_int8.int8_dot)(xs, ws)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_ref(x, w)))
    assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*out_spec)), 2)


def test_tensor_parallel_weight_is_not_gathered():
    P = jax.sharding.PartitionSpec
    mesh = _fsdp_tensor_mesh()
    rng = np.random.default_rng(12)
    x = jax.device_put(_rand(rng, (8, 16, 48)),
                       jax.sharding.NamedSharding(mesh, P("fsdp", None, None)))
    w = jax.device_put(_rand(rng, (32, 48)), jax.sharding.NamedSharding(mesh, P("tensor", None)))
    partitioned = jax.jit(cpu_int8.int8_dot).lower(x, w).compile().as_text()
    bare = jax.jit(lambda a, b: cpu_int8._ffi_dot_local(a.reshape(-1, 48), b)).lower(x, w)
    assert "all-gather" in bare.compile().as_text()  # what the opaque custom call costs
    assert "all-gather" not in partitioned and "all-reduce" not in partitioned
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_int8.int8_dot)(x, w)),
                                  np.asarray(_ref(x, w)))
