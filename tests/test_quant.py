"""Quantizers against numpy transcriptions of the published formulas (shared/reference/bitnet.md)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from bitnet_jax.core import cpu_int8, cpu_int8_fused, hadamard, matmul, quant
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer

EPS = 1e-5
SHAPES = [(1, 1), (1, 7), (5, 1), (16, 33), (2, 3, 64)]
DTYPES = [jnp.float32, jnp.bfloat16]


# ---------------------------------------------------------------- numpy transcriptions

def np_ternary(w, axis=None):
    """b1.58 released code: s = 1 / max(mean|W|, 1e-5); clip(round(W s), -1, 1) / s."""
    s = 1.0 / np.maximum(np.abs(w).mean(axis=axis, keepdims=axis is not None), 1e-5)
    return np.clip(np.round(w * s), -1, 1) / s


def np_ternary_unrounded(w):
    return w / np.maximum(np.abs(w).mean(), 1e-5)


def np_binary(w):
    """BitNet: Sign(W - mean W) (Sign(0) = -1) times mean|W|."""
    signs = np.where(w - w.mean() > 0, 1.0, -1.0)
    return signs * np.abs(w).mean()


def np_absmax(x, bits):
    q = 2 ** (bits - 1) - 1
    s = q / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * s), -q - 1, q) / s


def np_absmax_unrounded(x, bits):
    return x * (2 ** (bits - 1) - 1) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)


def np_absmean4_unrounded(x):
    return math.sqrt(7) * x / (np.abs(x).mean(axis=-1, keepdims=True) + EPS)


def np_absmean4(x):
    """a4.8: beta / sqrt(7) * RoundClip(sqrt(7) x / (beta + eps), -8, 7), beta = mean|x|."""
    beta = np.abs(x).mean(axis=-1, keepdims=True)
    return beta / math.sqrt(7) * np.clip(np.round(math.sqrt(7) * x / (beta + EPS)), -8, 7)


def np_topk(x, ratio):
    k = math.ceil(ratio * x.shape[-1])
    threshold = np.sort(np.abs(x), axis=-1)[..., -k][..., None]
    return np.where(np.abs(x) >= threshold, x, 0.0)


# ---------------------------------------------------------------- inputs

def make_input(shape, dtype, seed=0):
    """Random normal values with an all-zero row and a huge outlier where the shape allows."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if x.shape[-2] >= 3 if x.ndim >= 2 else False:
        x[..., 0, :] = 0.0  # all-zero row
        x[..., 1, 0] = 3e4  # huge outlier
    return jnp.asarray(x, dtype)


def reference(fn, x, *args, **kwargs):
    """Run a numpy transcription in float32 on the input's values, cast back to its dtype."""
    out = fn(np.asarray(x, np.float32), *args, **kwargs)
    return np.asarray(jnp.asarray(out, x.dtype), np.float32)


def assert_close(got, want, dtype, unrounded=None):
    """Equal up to one ulp of `dtype`, except exact rounding ties, if `unrounded` is given.

    One bf16 ulp is 2^-8 relative; a flipped rounding moves a value by a whole quantization
    step (at least 1/127 of it), so this still catches any formula mismatch. Values that sit
    exactly on a .5 tie before rounding (frequent with bfloat16 inputs) may round either way
    on platforms whose division is not correctly rounded (XLA:GPU divides approximately).
    """
    rtol = 2 ** -8 if dtype == jnp.bfloat16 else 1e-6
    got = np.asarray(got, np.float32)
    wrong = ~np.isclose(got, want, rtol=rtol, atol=0)
    if unrounded is not None:
        wrong &= np.abs(np.abs(unrounded - np.floor(unrounded)) - 0.5) > 1e-4
    assert not wrong.any(), f"{wrong.sum()} mismatches, e.g. got {got[wrong][:5]} want {want[wrong][:5]}"


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_absmean_matches_formula(shape, dtype):
    w = make_input(shape, dtype) * 0.02
    got = jax.jit(lambda v: quant.ternary_absmean(v).dequantize(v.dtype))(w)
    assert got.dtype == dtype
    assert_close(got, reference(np_ternary, w), dtype, np_ternary_unrounded(np.asarray(w, np.float32)))
    codes = quant.ternary_absmean(w).codes
    assert set(np.unique(np.asarray(codes))) <= {-1.0, 0.0, 1.0}


def test_ternary_per_channel_and_group():
    w = make_input((64, 24), jnp.float32, seed=1) * 0.05
    per_channel = quant.ternary_absmean(w, "channel").dequantize()
    np.testing.assert_allclose(per_channel, np_ternary(np.asarray(w), axis=0), rtol=1e-6)
    grouped = quant.ternary_absmean(w, "group", group_size=16).dequantize()
    want = np_ternary(np.asarray(w).reshape(4, 16, 24), axis=1).reshape(64, 24)
    np.testing.assert_allclose(grouped, want, rtol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        quant.ternary_absmean(w, "group", group_size=10)


def test_all_zero_weight_quantizes_to_zero():
    zero = jnp.zeros((4, 8))
    for q in (quant.ternary_absmean(zero), quant.binary_sign(zero), quant.absmax_weight(zero, 4)):
        assert np.all(np.isfinite(q.dequantize()))
    assert np.all(quant.ternary_absmean(zero).dequantize() == 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_sign_matches_formula(shape, dtype):
    w = make_input(shape, dtype, seed=2)
    got = quant.binary_sign(w).dequantize(dtype)
    assert_close(got, reference(np_binary, w), dtype)


def test_binary_sign_of_zero_is_minus_one():
    w = jnp.array([[-1.0, 0.0, 1.0]])  # mean 0, so W - alpha = 0 at the middle entry
    np.testing.assert_array_equal(quant.binary_sign(w).codes, [[-1.0, -1.0, 1.0]])


def test_absmax_weight_bits():
    w = make_input((8, 16), jnp.float32, seed=3)
    q = quant.absmax_weight(w, 4)
    assert np.abs(np.asarray(q.codes)).max() == 7
    s = 7 / np.abs(np.asarray(w)).max()
    np.testing.assert_allclose(q.dequantize(), np.clip(np.round(np.asarray(w) * s), -7, 7) / s,
                               rtol=1e-6)


# ---------------------------------------------------------------- activations

@pytest.mark.parametrize("dtype", DTYPES)
def test_row_absmax_is_the_largest_magnitude_of_each_row(dtype):
    rows = np.array([[1.5, -3.0, 2.0, 0.25],  # the largest magnitude negative
                     [-1.0, -2.0, -0.5, -4.0],  # every entry negative
                     [0.0, -0.0, 0.0, -0.0],  # zeros of both signs: 0
                     [-0.0, -0.0, -0.0, -0.0],  # negative zeros only: +0 too
                     [7.0, 1.0, -6.5, 3.0],  # the largest magnitude positive
                     [-0.0, 2.0**-120, -(2.0**-126), 0.0]], np.float32)  # tiny magnitudes
    random = np.asarray(make_input((3, 2, 129), jnp.float32, seed=11)) * 50
    for x in (rows, random):
        x = jnp.asarray(x, dtype)
        got = jax.jit(quant.row_absmax)(x)
        want = np.max(np.abs(np.asarray(x, np.float32)), axis=-1, keepdims=True)
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)
        assert not np.signbit(np.asarray(got, np.float32)).any()  # a -0.0 row max comes out +0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_absmax_per_token_matches_formula(shape, dtype, bits):
    x = make_input(shape, dtype, seed=4)
    got = jax.jit(lambda v: quant.absmax_per_token(v, bits).dequantize(v.dtype))(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, reference(np_absmax, x, bits), dtype,
                 np_absmax_unrounded(np.asarray(x, np.float32), bits))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_absmean4_matches_formula(shape, dtype):
    x = make_input(shape, dtype, seed=5)
    got = quant.absmean_per_token(x, 4).dequantize(dtype)
    assert_close(got, reference(np_absmean4, x), dtype,
                 np_absmean4_unrounded(np.asarray(x, np.float32)))
    codes = np.asarray(quant.absmean_per_token(x, 4).codes)
    assert codes.min() >= -8 and codes.max() <= 7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
def test_topk_matches_formula(shape, ratio):
    x = make_input(shape, jnp.float32, seed=6)
    np.testing.assert_array_equal(quant.topk_per_token(x, ratio), np_topk(np.asarray(x), ratio))


def test_topk_keeps_half_by_default():
    x = make_input((3, 64), jnp.float32, seed=7)[1:]
    kept = np.count_nonzero(np.asarray(quant.topk_per_token(x)), axis=-1)
    np.testing.assert_array_equal(kept, [32, 32])
    with pytest.raises(ValueError, match="keep_ratio"):
        quant.topk_per_token(x, 0.0)


# ---------------------------------------------------------------- Hadamard

@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_matches_scipy_and_is_orthogonal(n):
    x = make_input((3, n), jnp.float32, seed=8)
    atol = 1e-6 * float(np.abs(np.asarray(x)).max())  # float32 cancellation next to the outlier
    want = np.asarray(x) @ scipy.linalg.hadamard(n) / math.sqrt(n)
    np.testing.assert_allclose(hadamard.hadamard_transform(x), want, rtol=1e-5, atol=atol)
    h = np.asarray(hadamard.hadamard_transform(jnp.eye(n)))
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(hadamard.hadamard_transform(hadamard.hadamard_transform(x)), x, atol=atol)


def test_hadamard_blocks_and_errors():
    x = make_input((2, 24), jnp.float32, seed=9)
    want = (np.asarray(x).reshape(2, 3, 8) @ scipy.linalg.hadamard(8) / math.sqrt(8)).reshape(2, 24)
    np.testing.assert_allclose(hadamard.hadamard_transform(x, block_size=8), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard.hadamard_transform(x)
    assert hadamard.largest_power_of_two_divisor(6912) == 256
    np.testing.assert_array_equal(hadamard.rotate_activations(x),
                                  hadamard.hadamard_transform(x, block_size=8))


def test_hadamard_gradient_is_transform_of_gradient():
    x = make_input((2, 16), jnp.float32, seed=10)
    g = make_input((2, 16), jnp.float32, seed=11)
    grad = jax.grad(lambda v: jnp.sum(hadamard.hadamard_transform(v) * g))(x)
    np.testing.assert_allclose(grad, hadamard.hadamard_transform(g), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- STE

QUANTIZERS = {
    "ternary": WeightQuantizer("ternary", 1.58),
    "binary": WeightQuantizer("binary", 1),
    "absmax8": ActivationQuantizer("absmax", 8),
    "absmean4": ActivationQuantizer("absmean", 4),
    "topk+absmax8": ActivationQuantizer("absmax", 8, keep_ratio=0.5),
}


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_gradient_is_exactly_identity(name, dtype):
    quantizer = QUANTIZERS[name]
    x = make_input((4, 32), dtype, seed=12)
    cotangent = make_input((4, 32), dtype, seed=13)
    forward = quant.fake_quantize(quantizer, x)
    np.testing.assert_array_equal(np.asarray(forward, np.float32),
                                  np.asarray(quantizer(x).dequantize(dtype), np.float32))
    grad = jax.grad(lambda v: jnp.sum(quant.fake_quantize(quantizer, v) * cotangent))(x)
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(cotangent, np.float32))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_ste_does_not_differentiate_the_quantizer(name):
    """The gradient program holds no JVP of the quantizer: JAX differentiates `row_absmax`'s
    two-output reduction as a tree of slices (XLA:CPU then copies the activations transposed),
    and the STE discards that derivative anyway."""
    x = make_input((4, 2, 32), jnp.bfloat16, seed=14)
    loss = lambda v: jnp.sum(quant.fake_quantize(QUANTIZERS[name], v).astype(jnp.float32))
    def slices(fn):  # in the printed program, nested jaxprs included
        return len(re.findall(r"\bslice\[", str(jax.make_jaxpr(fn)(x))))
    assert slices(jax.grad(loss)) == slices(loss)


# ---------------------------------------------------------------- quantized matmul

A8, A4 = ActivationQuantizer("absmax", 8), ActivationQuantizer("absmean", 4)
TERNARY, BINARY = WeightQuantizer("ternary", 1.58), WeightQuantizer("binary", 1)
PAIRS = {
    "b1.58": (A8, TERNARY),
    "b1": (A8, BINARY),
    "a4-ternary": (A4, TERNARY),
    "w4a8": (A8, WeightQuantizer("absmax", 4)),
    "ternary-channel": (A8, WeightQuantizer("ternary", 1.58, "channel")),
    "ternary-group": (A8, WeightQuantizer("ternary", 1.58, "group", 16)),
    "topk": (ActivationQuantizer("absmax", 8, keep_ratio=0.5), TERNARY),
    "a4.8-topk": (ActivationQuantizer("absmean", 4, keep_ratio=0.55), TERNARY),
}


def _operands(seed=14):
    x = make_input((2, 5, 64), jnp.float32, seed=seed)
    w = make_input((64, 48), jnp.float32, seed=seed + 1) * 0.02
    return x, w


@pytest.mark.parametrize("name", PAIRS)
def test_quantized_dot_equals_fake_quant_matmul(name):
    qx, qw = PAIRS[name]
    x, w = _operands()
    want = np.asarray(qx(x).dequantize()) @ np.asarray(qw(w).dequantize())
    got = matmul.quantized_dot(x, w, qx, qw, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_path_equals_float_path(name, dtype):
    qx, qw = PAIRS[name]
    x, w = _operands(seed=16)
    dot = jax.jit(matmul.quantized_dot, static_argnums=(2, 3, 4, 5))
    float_path = dot(x.astype(dtype), w, qx, qw, dtype, False)
    integer_path = dot(x.astype(dtype), w, qx, qw, dtype, True)
    # Integer codes make both products exact; only the final rescale rounds, identically.
    np.testing.assert_array_equal(np.asarray(float_path, np.float32),
                                  np.asarray(integer_path, np.float32))


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_path_gradients_equal_float_path(name, dtype):
    # In bf16 on CPU both paths' weight gradients take X_q^T from the kernel that quantizes x's
    # rows (`cpu_int8_fused.quantize_transpose`), or build it inside the weight gradient's kernel
    # (`cpu_weight_gradient`, where it runs), per-group weight scales included.
    qx, qw = PAIRS[name]
    x, w = _operands(seed=21)
    cotangent = make_input((2, 5, 48), dtype, seed=22)

    def grads(integer):
        loss = lambda xv, wv: jnp.sum(  # noqa: E731
            matmul.quantized_dot(xv, wv, qx, qw, dtype, integer).astype(jnp.float32)
            * cotangent.astype(jnp.float32))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        hlo = grad.lower(x.astype(dtype), w).as_text()
        uses_kernel = cpu_int8.DEQUANTIZE_TRANSPOSE_TARGET in hlo
        uses_fused = (cpu_int8_fused.QUANTIZE_TRANSPOSE_TARGET in hlo
                      or cpu_int8.QUANTIZED_WEIGHT_GRADIENT_TARGET in hlo)
        assert uses_fused == (dtype == jnp.bfloat16 and cpu_int8_fused.available())
        assert not uses_kernel  # the codes' kernel only serves where the fused one is missing
        return grad(x.astype(dtype), w)

    for got, want in zip(grads(True), grads(False)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_gradient_is_x_transposed_g(dtype):
    """dW = X^T G over every leading axis, against float64 numpy (bf16 operands are exact in
    float32, so only the float32 summation order separates the two)."""
    x = make_input((3, 7, 40), dtype, seed=30)
    g = make_input((3, 7, 24), dtype, seed=31)
    got = jax.jit(matmul.weight_gradient)(x, g)
    x64 = np.asarray(x, np.float64).reshape(-1, 40)
    g64 = np.asarray(g, np.float64).reshape(-1, 24)
    assert got.dtype == jnp.float32 and got.shape == (40, 24)
    np.testing.assert_allclose(np.asarray(got, np.float64), x64.T @ g64, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot placement")
def test_bf16_backward_runs_no_float32_dot_on_cpu():
    """XLA:CPU converts a bf16 dot to float32 (an Eigen dot at half the rate) unless its left
    operand contracts its last axis in row-major layout; the weight gradient of a bf16 linear
    (unquantized input) is such a dot unless `weight_gradient` gives it a transposed copy. A
    jax upgrade that folds the copy back shows up here as a plain `dot(` in the compiled
    backward."""
    x = make_input((8, 64, 128), jnp.bfloat16, seed=32)
    w = make_input((128, 96), jnp.float32, seed=33)
    loss = lambda xv, wv: jnp.sum(  # noqa: E731
        matmul.quantized_dot(xv, wv, None, None, jnp.bfloat16).astype(jnp.float32) ** 2)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert " dot(" not in entry, entry


@pytest.mark.parametrize("name", ["b1.58", "ternary-group", "topk"])
def test_quantized_dot_gradients_are_ste(name):
    qx, qw = PAIRS[name]
    x, w = _operands(seed=18)
    cotangent = make_input((2, 5, 48), jnp.float32, seed=20)

    def reference_loss(xv, wv):  # fake quantization with STE, autodiff through the matmul
        return jnp.sum((quant.fake_quantize(qx, xv) @ quant.fake_quantize(qw, wv)) * cotangent)

    def loss(xv, wv):
        return jnp.sum(matmul.quantized_dot(xv, wv, qx, qw, jnp.float32) * cotangent)

    got = jax.grad(loss, argnums=(0, 1))(x, w)
    want = jax.grad(reference_loss, argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_integer_path_needs_quantized_operands():
    x, w = _operands()
    with pytest.raises(ValueError, match="integer"):
        matmul.quantized_dot(x, w, None, TERNARY, jnp.float32, integer=True)


def test_unquantized_dot_is_a_plain_matmul():
    x, w = _operands()
    got = matmul.quantized_dot(x, w, None, None, jnp.float32)
    np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sharding

def test_per_tensor_scale_is_global_under_sharding():
    cpus = jax.devices("cpu")[:8]  # the 8 simulated CPU devices of conftest, also on a GPU host
    mesh = jax.sharding.Mesh(np.array(cpus).reshape(4, 2), ("rows", "cols"))
    w = make_input((64, 32), jnp.float32, seed=21) * 0.02
    # Make shards differ in scale, so a per-shard mean would give a different answer.
    w = w * jnp.linspace(0.1, 3.0, 64)[:, None]
    sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", "cols")))
    assert len(sharded.sharding.device_set) == 8
    fn = jax.jit(lambda v: quant.ternary_absmean(v).dequantize())
    np.testing.assert_allclose(fn(sharded), np_ternary(np.asarray(w)), rtol=1e-6)
    x = make_input((8, 32), jnp.float32, seed=22)
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", "cols")))
    np.testing.assert_allclose(jax.jit(lambda v: quant.absmax_per_token(v).dequantize())(x_sharded),
                               np_absmax(np.asarray(x), 8), rtol=1e-6)


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None),
                                                    ("group", 16)])
def test_ternary_latent_quantizes_back_to_its_codes_and_scale(granularity, group_size):
    rng = np.random.default_rng(0)
    codes = jnp.asarray(rng.integers(-1, 2, (64, 48)), jnp.float32)
    gamma = quant.ternary_absmean(jnp.asarray(rng.normal(0, 0.02, (64, 48)), jnp.float32),
                                  granularity, group_size).scale
    again = quant.ternary_absmean(quant.ternary_latent(codes, gamma, granularity, group_size),
                                  granularity, group_size)
    np.testing.assert_array_equal(again.codes, codes)
    np.testing.assert_allclose(again.scale, gamma, rtol=1e-5)  # float32 summation order


@pytest.mark.parametrize("name", ["b1.58", "ternary-channel", "a4-ternary", "ternary-group"])
def test_int8_backward_rounds_only_the_input_gradient(name):
    qx, qw = PAIRS[name]
    x, w = _operands(seed=23)
    x = x.astype(jnp.bfloat16)
    cotangent = make_input((2, 5, 48), jnp.float32, seed=24)

    def grads(int8_backward):
        loss = lambda xv, wv: jnp.sum(  # noqa: E731
            matmul.quantized_dot(xv, wv, qx, qw, jnp.bfloat16, True, int8_backward)
            .astype(jnp.float32) * cotangent)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    (dx, dw), (dx_exact, dw_exact) = grads(True), grads(False)
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(dw_exact))
    dx, dx_exact = np.asarray(dx, np.float32), np.asarray(dx_exact, np.float32)
    if name == "ternary-group":  # per-group weight scales: no int8 product, exact
        np.testing.assert_array_equal(dx, dx_exact)
        return
    assert not np.array_equal(dx, dx_exact)  # it did take the 8-bit route
    # 8-bit rows of g: error about 1/254 of a row's largest entry per term.
    err = np.linalg.norm(dx - dx_exact) / np.linalg.norm(dx_exact)
    assert err < 0.02, err


def test_int8_backward_keeps_tiny_gradients():
    # Gradients are far below the activations' 1e-5 absmax floor; they must not be flushed.
    qx, qw = PAIRS["b1.58"]
    x, w = _operands(seed=25)
    g = make_input((2, 5, 48), jnp.float32, seed=26) * 1e-9

    def dx(int8_backward):
        loss = lambda xv: jnp.sum(  # noqa: E731
            matmul.quantized_dot(xv, w, qx, qw, jnp.bfloat16, True, int8_backward)
            .astype(jnp.float32) * g)
        return np.asarray(jax.jit(jax.grad(loss))(x.astype(jnp.bfloat16)), np.float32)

    got, want = dx(True), dx(False)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


def test_int8_backward_needs_the_integer_path():
    x, w = _operands()
    with pytest.raises(ValueError, match="int8_backward"):
        matmul.quantized_dot(x, w, A8, TERNARY, jnp.float32, integer=False, int8_backward=True)


@pytest.mark.parametrize("name,integer", [("b1.58", False), ("b1.58", True),
                                          ("full precision", False)])
def test_out_dtype_rounds_the_accumulator_once(name, integer):
    """out_dtype=float32 keeps the float32 result (what bf16 output would round), with the
    same gradients: the backward casts the cotangent to the compute dtype either way."""
    qx, qw = PAIRS.get(name, (None, None))
    rng = np.random.default_rng(31)  # no outliers: they would zero most ternary codes
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(0, 0.02, (64, 48)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 5, 48)), jnp.bfloat16).astype(jnp.float32)

    def run(out_dtype):
        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, qx, qw, jnp.bfloat16, integer, out_dtype=out_dtype)
            return jnp.sum(y.astype(jnp.float32) * g), y
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, w)

    (dx32, dw32), y32 = run(jnp.float32)
    (dx16, dw16), y16 = run(None)
    assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y32.astype(jnp.bfloat16), np.float32),
                                  np.asarray(y16, np.float32))
    assert np.mean(np.asarray(y32) != np.asarray(y16, np.float32)) > 0.9
    np.testing.assert_array_equal(np.asarray(dx32, np.float32), np.asarray(dx16, np.float32))
    np.testing.assert_array_equal(np.asarray(dw32), np.asarray(dw16))



# The fake-quantized path's int8 product tests name their quantizers.
INT8_PRODUCT_QUANTIZERS = {"A8": A8, "A4": A4, "TERNARY": TERNARY, "BINARY": BINARY,
                           "W8_CHANNEL": WeightQuantizer("absmax", 8, "channel"),
                           "TERNARY_G32": WeightQuantizer("ternary", 1.58, "group", 32),
                           "NONE": None}


def _int8_dot_in(hlo: str) -> bool:
    return any("dot_general" in line and "xi8>" in line for line in hlo.splitlines())


@pytest.mark.parametrize("qx,qw,k,int8", [
    ("A8", "TERNARY", 40, True), ("A4", "TERNARY", 40, True),
    ("A8", "BINARY", 40, True), ("A8", "W8_CHANNEL", 1024, True),
    # sums of 8-bit x 8-bit codes beyond 2^24: float32 accumulation is not exact there
    ("A8", "W8_CHANNEL", 1040, False), ("A8", "TERNARY_G32", 64, False),  # per-group scales
    ("NONE", "TERNARY", 40, False), ("A8", "NONE", 40, False)])
@pytest.mark.parametrize("amx", [False, True])
def test_fake_quantization_takes_the_int8_product_on_amx(qx, qw, k, int8, amx, monkeypatch):
    # Where XLA's int8 dot beats its bf16 dot, the fake-quantized forward product runs on int8
    # codes when that gives the same numbers: output and gradients equal bit for bit.
    if not cpu_int8_fused.available():
        pytest.skip("the fake-quantized path uses the CPU kernels only where they are built")
    quantize_x, quantize_w = INT8_PRODUCT_QUANTIZERS[qx], INT8_PRODUCT_QUANTIZERS[qw]
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(2, 40, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, 24)) * 0.05, jnp.float32)

    def value_and_grads(amx_now):
        monkeypatch.setattr(cpu_int8, "_has_amx_int8", lambda: amx_now)
        loss = lambda xv, wv: jnp.sum(matmul.quantized_dot(  # noqa: E731
            xv, wv, quantize_x, quantize_w, jnp.bfloat16).astype(jnp.float32) ** 2)
        # A fresh function each time: jit's trace cache would keep the other case's choice.
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return fn.lower(x, w).as_text(), fn(x, w)

    hlo, got = value_and_grads(amx)
    assert _int8_dot_in(hlo) == (amx and int8)
    _, want = value_and_grads(False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("qx,qw,k,int8", [
    ("A8", "TERNARY", 40, True), ("A4", "TERNARY", 40, True), ("A8", "BINARY", 300, True),
    ("A8", "W8_CHANNEL", 1024, True), ("A8", "W8_CHANNEL", 1040, False),
    ("A8", "TERNARY_G32", 64, False), ("NONE", "TERNARY", 40, False)])
def test_fake_quantization_takes_the_fused_int8_kernel_without_amx(qx, qw, k, int8, monkeypatch):
    # On CPUs without AMX our VNNI kernel's int8 product beats XLA's bf16 dot, so the
    # fake-quantized forward runs as the integer path's fused kernel where that gives the same
    # numbers: output and gradients equal the bf16 codes' product bit for bit.
    if not cpu_int8_fused.available():
        pytest.skip("the fake-quantized path uses the CPU kernels only where they are built")
    monkeypatch.setattr(cpu_int8, "_has_amx_int8", lambda: False)  # as on a CPU without AMX
    monkeypatch.setattr(cpu_int8, "cpu_flags", lambda: {"avx512_vnni"})
    quantize_x, quantize_w = INT8_PRODUCT_QUANTIZERS[qx], INT8_PRODUCT_QUANTIZERS[qw]
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(2, 40, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, 24)) * 0.05, jnp.float32)

    def value_and_grads():
        loss = lambda xv, wv: jnp.sum(matmul.quantized_dot(  # noqa: E731
            xv, wv, quantize_x, quantize_w, jnp.bfloat16).astype(jnp.float32) ** 2)
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # fresh: no cached trace
        return fn.lower(x, w).as_text(), fn(x, w)

    hlo, got = value_and_grads()
    fused = (cpu_int8_fused.ABSMAX_QUANT_DOT_TARGET in hlo
             or cpu_int8_fused.SCALED_QUANT_DOT_TARGET in hlo)
    assert fused == int8
    monkeypatch.setattr(cpu_int8, "int8_beats_bf16", lambda rows: False)
    hlo, want = value_and_grads()
    assert cpu_int8_fused.ABSMAX_QUANT_DOT_TARGET not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("qw,k,int8", [
    (TERNARY, 64, True), (BINARY, 64, True),
    (WeightQuantizer("absmax", 8, "channel"), 1024, True),
    (WeightQuantizer("absmax", 8, "channel"), 1040, False),  # sums past 2^24: not exact
    (WeightQuantizer("ternary", 1.58, "group", 32), 64, False), (None, 64, False)])
def test_fake_quantization_lowers_to_the_int8_product_for_nvidia_gpus(qw, k, int8):
    # Lowered for a GPU (from this CPU host), fake quantization takes the integer path's int8
    # product where it is exact; for a TPU it keeps the bf16 codes' product.
    x = jnp.ones((2, 16, k), jnp.bfloat16)
    w = jnp.ones((k, 8), jnp.float32)

    def loss(xv, wv):
        return jnp.sum(matmul.quantized_dot(xv, wv, A8, qw, jnp.bfloat16).astype(jnp.float32))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for platform, want in (("cuda", int8), ("tpu", False)):
        hlo = grad.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert _int8_dot_in(hlo) == want, platform
