"""The fused quantize-and-multiply kernels (bitnet_jax.core.cpu_int8_fused) equal the unfused
integer path and the fake-quant path bit for bit, forward and backward, on odd shapes, under
vmap and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import (cpu_input_gradient, cpu_int8, cpu_int8_fused, cpu_weight_gradient,
                             matmul, quant)
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer

pytestmark = pytest.mark.skipif(not cpu_int8_fused.available(),
                                reason=f"int8 kernels unavailable: "
                                       f"{cpu_int8.unavailable_reason()}")

TERNARY = WeightQuantizer("ternary", 1.58)
CHANNEL = WeightQuantizer("ternary", 1.58, "channel")
A8 = ActivationQuantizer("absmax", 8)
A4 = ActivationQuantizer("absmean", 4)


def _bits(a):
    return np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.uint32)


def _operands(m, k, n, seed):
    rng = np.random.default_rng(seed)
    # Heavy-tailed rows with exact ties (multiples of the absmax) exercise rounding.
    x = rng.standard_t(3, (m, k)).astype(np.float32)
    x[:, : min(k, 3)] = np.round(x[:, : min(k, 3)] * 4) / 4
    w = rng.normal(0, 0.02, (k, n)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w)


# Direct path (<= 16 rows), packed path with row tails (not a multiple of 6, past one 240-row
# block), K tails (not a multiple of 4 or 16), N tails (not a multiple of 16 or 64).
SHAPES = [(1, 1, 1), (3, 5, 7), (16, 64, 48), (17, 100, 33), (70, 130, 70), (301, 257, 129)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("qx,qw", [(A8, TERNARY), (A4, CHANNEL)], ids=["a8", "a4-channel"])
def test_fused_path_is_exact(m, k, n, qx, qw, monkeypatch):
    """Output and all gradients equal the unfused integer path (int8 codes, `int8_dot`,
    `dequantize_transpose`) bit for bit; output and dx also equal fake quantization. The weight
    gradient's operand X_q^T is exact too, but XLA may accumulate X^T G in a different order
    than the fake-quant path's dot (its layout differs), so dw is compared within float32
    accumulation rounding there."""
    x, w = _operands(m, k, n, seed=m * 1000 + k * 10 + n)
    g = jnp.asarray(np.random.default_rng(n).normal(size=(m, n)), jnp.bfloat16)

    def run(integer, fused):
        if not fused:
            monkeypatch.setattr(cpu_int8_fused, "available", lambda: False)
        if not integer:  # fake quantization on bf16 codes, not as the int8 product it equals
            monkeypatch.setattr(cpu_int8, "int8_beats_bf16", lambda rows: False)

        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, qx, qw, jnp.bfloat16, integer)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y
        fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        hlo = fn.lower(x, w).as_text()
        fused_target = (cpu_int8_fused.ABSMAX_QUANT_DOT_TARGET if qx.kind == "absmax"
                        else cpu_int8_fused.SCALED_QUANT_DOT_TARGET)
        assert (fused_target in hlo) == fused
        # X_q^T from x's rows: written, or built inside the weight gradient's kernel
        assert (cpu_int8_fused.QUANTIZE_TRANSPOSE_TARGET in hlo
                or cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET in hlo) == fused
        (dx, dw), y = fn(x, w)
        monkeypatch.undo()
        return y, dx, dw

    y, dx, dw = run(integer=True, fused=True)
    for got, want in zip((y, dx, dw), run(integer=True, fused=False)):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    y_fake, dx_fake, dw_fake = run(integer=False, fused=False)
    np.testing.assert_array_equal(_bits(y), _bits(y_fake))
    np.testing.assert_array_equal(_bits(dx), _bits(dx_fake))
    np.testing.assert_allclose(dw, dw_fake, rtol=0, atol=1e-6 * m * float(np.abs(dw_fake).max()))


@pytest.mark.parametrize("m,k", [(1, 1), (5, 3), (33, 17), (300, 130)])
def test_quantize_transpose_equals_xla(m, k):
    x, _ = _operands(m, k, 1, seed=m + k)
    xq = jax.jit(lambda v: quant.absmax_per_token(v, 8))(x)
    _, multiplier, scale = cpu_int8_fused.absmax_quant_dot(
        x, jnp.zeros((1, k), jnp.int8), jnp.ones((1,), jnp.float32))
    np.testing.assert_array_equal(_bits(scale), _bits(xq.scale[:, 0]))
    got = cpu_int8_fused.quantize_transpose(x, multiplier, scale, -128, 127)
    want = (xq.codes.astype(jnp.int8).astype(jnp.float32) * xq.scale).astype(jnp.bfloat16).T
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_zero_rows_and_lead_dims():
    x = jnp.zeros((2, 3, 40), jnp.bfloat16)
    y, multiplier, scale = cpu_int8_fused.absmax_quant_dot(
        x, jnp.ones((24, 40), jnp.int8), jnp.ones((24,), jnp.float32))
    assert y.shape == (2, 3, 24) and multiplier.shape == scale.shape == (2, 3)
    assert not np.any(np.asarray(y, np.float32))
    np.testing.assert_array_equal(np.asarray(scale), np.float32(1e-5) * np.float32(1 / 127))
    # floor 0 (gradients): a zero row takes max|x| = 1; a tiny row keeps its own absmax
    x = x.at[1, 2, 5].set(-3e-12)
    y, _, scale = cpu_int8_fused.absmax_quant_dot(
        x, jnp.ones((24, 40), jnp.int8), jnp.ones((24,), jnp.float32), floor=0.0)
    assert float(scale[0, 0]) == np.float32(1) * np.float32(1 / 127)
    tiny = np.float32(np.asarray(x[1, 2, 5], np.float32))
    assert float(scale[1, 2]) == -tiny * np.float32(1 / 127)
    np.testing.assert_allclose(np.asarray(y[1, 2], np.float32), -3e-12, rtol=1e-2)


def test_wrong_operands_are_refused():
    x = jnp.zeros((4, 8), jnp.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        cpu_int8_fused.absmax_quant_dot(x.astype(jnp.float32), jnp.zeros((3, 8), jnp.int8),
                                        jnp.ones((3,), jnp.float32))
    with pytest.raises(ValueError, match="w_codes"):
        cpu_int8_fused.absmax_quant_dot(x, jnp.zeros((3, 7), jnp.int8),
                                        jnp.ones((3,), jnp.float32))
    with pytest.raises(ValueError, match="w_scale"):
        cpu_int8_fused.absmax_quant_dot(x, jnp.zeros((3, 8), jnp.int8),
                                        jnp.ones((), jnp.float32))
    with pytest.raises(ValueError, match="floor"):
        cpu_int8_fused.absmax_quant_dot(x, jnp.zeros((3, 8), jnp.int8),
                                        jnp.ones((3,), jnp.float32), floor=-1.0)


def test_vmap_runs_each_batch_element():
    x, w = _operands(12, 40, 24, seed=5)
    xb = x.reshape(3, 4, 40)
    w_codes = jnp.asarray(np.random.default_rng(6).integers(-1, 2, (24, 40)), jnp.int8)
    w_scale = jnp.full((24,), 0.5, jnp.float32)
    want = cpu_int8_fused.absmax_quant_dot(xb, w_codes, w_scale)
    got = jax.jit(jax.vmap(cpu_int8_fused.absmax_quant_dot, in_axes=(0, None, None)))(
        xb, w_codes, w_scale)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    _, mult, scale = want
    got_t = jax.vmap(cpu_int8_fused.quantize_transpose, in_axes=(0, 0, 0, None, None))(
        xb, mult, scale, -128, 127)
    want_t = cpu_int8_fused.quantize_transpose(xb, mult, scale, -128, 127)  # (K, 3 * 4)
    np.testing.assert_array_equal(_bits(got_t), _bits(want_t.reshape(40, 3, 4).transpose(1, 0, 2)))


@pytest.mark.parametrize("qx,qw", [(A8, TERNARY), (A4, CHANNEL)], ids=["a8", "a4-channel"])
def test_partitioned_under_gspmd(qx, qw):
    """On an fsdp x tensor mesh the fused calls run on local shards (no all-gather of the
    activations or of a tensor-parallel weight, except that where our kernel takes the exact dx
    it gathers its split contraction, the weight's codes and g along the out features, to keep
    the single-device sums: `cpu_input_gradient`) and give the single-device result: y and dx
    bit for bit, dw up to float32 rounding (its sum over rows is split across devices)."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    x, w = _operands(8 * 6, 64, 32, seed=9)
    x = x.reshape(8, 6, 64)

    def loss(xv, wv):
        y = matmul.quantized_dot(xv, wv, qx, qw, jnp.bfloat16, True)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("fsdp", None, None)))
    ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, P(None, "tensor")))
    hlo = fn.lower(xs, ws).compile().as_text()
    gathered = [line.split("=", 1)[1].split()[0] for line in hlo.splitlines()
                if " all-gather(" in line]
    assert not gathered or cpu_input_gradient.available()
    n = str(w.shape[1])  # gathered along the out features: codes, scales and g, never x
    assert all(shape.split("[")[1].split("]")[0].split(",")[-1] == n for shape in gathered), \
        gathered
    (dx, dw), y = fn(xs, ws)
    (dx_want, dw_want), y_want = fn(x, w)
    np.testing.assert_array_equal(_bits(y), _bits(y_want))
    np.testing.assert_array_equal(_bits(dx), _bits(dx_want))
    np.testing.assert_allclose(dw, dw_want, rtol=1e-6, atol=1e-6 * float(np.abs(dw_want).max()))


@pytest.mark.parametrize("m,k,n", [(3, 5, 7), (17, 100, 33), (301, 257, 129)])
@pytest.mark.parametrize("g_size", ["unit", "tiny"])
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_int8_backward_through_the_kernel_equals_the_xla_codes(m, k, n, g_size, amx,
                                                               monkeypatch):
    """With `int8_backward` our kernels quantize g's rows (floor 0): inside the VNNI product,
    or, where XLA takes the int8 product (AMX CPUs: forced), in one pass before it. dx equals
    the integer path with XLA's codes of g bit for bit, tiny gradients (far below the
    activations' 1e-5 floor) and all-zero rows included; dw stays exact."""
    x, w = _operands(m, k, n, seed=m + k + n)
    g = np.random.default_rng(n).normal(size=(m, n)) * (1.0 if g_size == "unit" else 1e-9)
    g[0] = 0.0
    g = jnp.asarray(g, jnp.bfloat16)
    if amx:
        monkeypatch.setattr(cpu_int8, "xla_int8_is_faster", lambda rows: True)
    target = cpu_int8.ABSMAX_QUANTIZE_TARGET if amx else cpu_int8_fused.ABSMAX_QUANT_DOT_TARGET

    def grads(kernels):
        with monkeypatch.context() as patches:
            if not kernels:
                patches.setattr(cpu_int8_fused, "available", lambda: False)

            def loss(xv, wv):
                y = matmul.quantized_dot(xv, wv, A8, TERNARY, jnp.bfloat16, True, True)
                return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32))
            fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
            assert fn.lower(x, w).as_text().count(target) == (2 if kernels else 0)
            return fn(x, w)

    (dx, dw), (dx_xla, dw_xla) = grads(kernels=True), grads(kernels=False)
    np.testing.assert_array_equal(_bits(dx), _bits(dx_xla))
    assert not np.any(np.asarray(dx, np.float32)[0])
    assert np.any(np.asarray(dx, np.float32)[1:])  # not flushed
    np.testing.assert_allclose(dw, dw_xla, rtol=0, atol=1e-6 * m * float(np.abs(dw_xla).max()))


@pytest.mark.parametrize("m,k", [(1, 1), (5, 3), (33, 17), (300, 130)])
@pytest.mark.parametrize("bits", [8, 4])
def test_absmax_quantize_equals_xla(m, k, bits):
    """Codes, mult and scale of the one-pass quantization equal XLA's `absmax_per_token` and
    `absmax_row_parameters` bit for bit (rows of heavy tails and exact ties, zero rows)."""
    x, _ = _operands(m, k, 1, seed=3 * m + k)
    x = x.at[0].set(0.0)
    codes, mult, scale = jax.jit(lambda v: cpu_int8_fused.absmax_quantize(v, bits))(x)
    want = jax.jit(lambda v: quant.absmax_per_token(v, bits))(x)
    q_max = 2 ** (bits - 1) - 1
    want_mult, want_scale = jax.jit(
        lambda v: quant.absmax_row_parameters(v.astype(jnp.float32), q_max, 1e-5))(x)
    assert codes.dtype == jnp.int8 and codes.shape == (m, k) and mult.shape == scale.shape == (m,)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want.codes).astype(np.int8))
    np.testing.assert_array_equal(_bits(scale), _bits(want_scale[:, 0]))
    np.testing.assert_array_equal(_bits(mult), _bits(want_mult[:, 0]))


def test_absmax_quantize_under_vmap_and_on_a_sharded_mesh():
    x, _ = _operands(48, 40, 1, seed=11)
    want = cpu_int8_fused.absmax_quantize(x)
    got = jax.jit(jax.vmap(cpu_int8_fused.absmax_quantize))(x.reshape(4, 12, 40))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a).reshape(np.shape(b)), np.asarray(b))
    devices = jax.devices()
    if len(devices) < 8:
        return
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    fn = jax.jit(cpu_int8_fused.absmax_quantize)
    assert "all-gather" not in fn.lower(xs).compile().as_text()
    for a, b in zip(fn(xs), want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("qx", [A8, ActivationQuantizer("absmax", 8, keep_ratio=0.5)],
                         ids=["a8", "a8-topk"])
def test_xla_int8_product_takes_the_one_pass_activation_quantization(qx, monkeypatch):
    """Where XLA takes the int8 product (AMX CPUs: forced here), x is quantized by
    `absmax_quantize` and the backward reuses its row parameters: output and gradients equal
    XLA's quantization of x bit for bit."""
    monkeypatch.setattr(cpu_int8, "xla_int8_is_faster", lambda rows: True)
    x, w = _operands(70, 130, 70, seed=12)
    x = x.reshape(2, 35, 130)
    g = jnp.asarray(np.random.default_rng(13).normal(size=(2, 35, 70)), jnp.bfloat16)

    def run(integer):
        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, qx, TERNARY, jnp.bfloat16, integer)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y
        fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        hlo = fn.lower(x, w).as_text()
        (dx, dw), y = fn(x, w)
        return hlo.count(cpu_int8.ABSMAX_QUANTIZE_TARGET), (y, dx, dw)

    for integer in (False, True):
        calls, got = run(integer)
        assert calls == 1
        with monkeypatch.context() as m:
            m.setattr(matmul, "_kernel_quantizes_activation", lambda *args: False)
            calls, want = run(integer)
        assert calls == 0
        for a, b in zip(got, want):
            np.testing.assert_array_equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------------------------
# int8_scaled_dot: codes quantized beforehand, the product and its scales in one call.

def _scaled_dot_reference(codes, row_scale, w_codes, w_scale):
    acc = jax.lax.dot_general(codes, w_codes, (((codes.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return ((acc.astype(jnp.float32) * row_scale[..., None]) * w_scale).astype(jnp.bfloat16)


def _scaled_dot_operands(m, k, n, seed):
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    row_scale = jnp.asarray(rng.lognormal(-4, 2, m), jnp.float32)
    w_codes = jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8)
    w_scale = jnp.asarray(rng.lognormal(-3, 1, n), jnp.float32)
    return codes, row_scale, w_codes, w_scale


@pytest.mark.parametrize("m,k,n", SHAPES + [(64, 1000, 20), (250, 64, 64)])
def test_int8_scaled_dot_equals_xlas_product_and_pass(m, k, n):
    """bf16((codes @ w.T) * row_scale * w_scale), bit for bit XLA's int8 dot and the pass over
    its sums, on the direct and packed paths with every tail (full int8 ranges)."""
    operands = _scaled_dot_operands(m, k, n, seed=m + 7 * k + n)
    got = jax.jit(cpu_int8_fused.int8_scaled_dot)(*operands)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    np.testing.assert_array_equal(_bits(got), _bits(jax.jit(_scaled_dot_reference)(*operands)))


def test_int8_scaled_dot_lead_dims_vmap_and_refusals():
    codes, row_scale, w_codes, w_scale = _scaled_dot_operands(24, 40, 24, seed=3)
    want = cpu_int8_fused.int8_scaled_dot(codes, row_scale, w_codes, w_scale)
    lead = cpu_int8_fused.int8_scaled_dot(codes.reshape(2, 3, 4, 40), row_scale.reshape(2, 3, 4),
                                          w_codes, w_scale)
    np.testing.assert_array_equal(_bits(lead), _bits(want.reshape(2, 3, 4, 24)))
    mapped = jax.jit(jax.vmap(cpu_int8_fused.int8_scaled_dot, in_axes=(0, 0, None, None)))(
        codes.reshape(4, 6, 40), row_scale.reshape(4, 6), w_codes, w_scale)
    np.testing.assert_array_equal(_bits(mapped), _bits(want.reshape(4, 6, 24)))
    with pytest.raises(TypeError, match="int8 codes"):
        cpu_int8_fused.int8_scaled_dot(codes.astype(jnp.int32), row_scale, w_codes, w_scale)
    with pytest.raises(ValueError, match="w_codes"):
        cpu_int8_fused.int8_scaled_dot(codes, row_scale, w_codes[:, :39], w_scale)


def test_int8_scaled_dot_partitioned_under_gspmd():
    """Rows split as the codes' rows, output features as the weight's: no all-gather of either,
    the single-device result bit for bit."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    codes, row_scale, w_codes, w_scale = _scaled_dot_operands(64, 72, 32, seed=4)
    put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    args = (put(codes, P("fsdp", None)), put(row_scale, P("fsdp")), put(w_codes, P("tensor")),
            put(w_scale, P("tensor")))
    fn = jax.jit(cpu_int8_fused.int8_scaled_dot)
    assert "all-gather" not in fn.lower(*args).compile().as_text()
    np.testing.assert_array_equal(_bits(fn(*args)),
                                  _bits(cpu_int8_fused.int8_scaled_dot(codes, row_scale, w_codes,
                                                                       w_scale)))


@pytest.mark.parametrize("integer,int8_backward", [(False, False), (True, False), (True, True)],
                         ids=["fake", "integer", "int8-backward"])
@pytest.mark.parametrize("qx", [A8, A4], ids=["a8", "a4"])
def test_where_the_kernels_have_amx_shared_inputs_are_quantized_once(qx, integer, int8_backward,
                                                                     monkeypatch):
    """Where our products run on AMX tiles (`cpu_int8.kernel_uses_amx`, forced; the kernel
    multiplies on VNNI here unless the CPU has AMX), both paths quantize an input that several
    linears share once and multiply its codes with `int8_scaled_dot`, and X_q^T for their weight
    gradients is written once (where the weight gradient's kernel does not build it itself):
    output and gradients equal the path without it bit for bit."""
    x, w = _operands(2 * 40, 96, 48, seed=21)
    x = x.reshape(2, 40, 96)
    w2 = w[:, ::-1] * 1.5
    g = jnp.asarray(np.random.default_rng(22).normal(size=(2, 40, 48)), jnp.float32)

    def run(amx):
        monkeypatch.setattr(cpu_int8, "kernel_uses_amx", lambda: amx)
        # The backward's AMX kernels have no VNNI path (tests/test_cpu_weight_gradient.py and
        # test_cpu_input_gradient.py cover them where the CPU has tiles): here dW keeps X_q^T and
        # XLA's dot, and dx XLA's dot.
        monkeypatch.setattr(cpu_weight_gradient, "available", lambda: False)
        monkeypatch.setattr(cpu_input_gradient, "available", lambda: False)
        jax.clear_caches()  # traces of the custom VJP made with the other choice

        def loss(xv, wv, w2v):  # two linears on the same input, as q and k, or gate and up
            y = sum(matmul.quantized_dot(xv, a, qx, TERNARY, jnp.bfloat16, integer,
                                         int8_backward).astype(jnp.float32) for a in (wv, w2v))
            return jnp.sum(y * g)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return fn.lower(x, w, w2).compile().as_text(), fn(x, w, w2)

    hlo, got = run(True)
    assert hlo.count(cpu_int8.INT8_SCALED_DOT_TARGET) == 2
    assert hlo.count(cpu_int8_fused.QUANTIZE_TRANSPOSE_TARGET) == 1
    assert hlo.count(cpu_int8.ABSMAX_QUANTIZE_TARGET) == (1 if qx is A8 else 0)
    assert hlo.count(cpu_int8.ABSMAX_QUANT_DOT_TARGET) == (2 if int8_backward else 0)
    assert cpu_int8.TARGET_NAME not in hlo and "s32[" not in hlo  # no int32 sums in memory
    _, want = run(False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
