"""Decode kernels: the packed ternary product equals the int8 product exactly (odd shapes and
tails included); the bf16 product equals XLA's up to float32 summation order."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_decode, packing

needs_kernel = pytest.mark.skipif(not cpu_decode.available(),
                                  reason=f"kernel: {cpu_decode.unavailable_reason()}")


def int8_reference(x, codes_OxI):
    return np.asarray(jax.lax.dot_general(jnp.asarray(x), jnp.asarray(codes_OxI),
                                          (((x.ndim - 1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.int32))


@needs_kernel
@pytest.mark.parametrize("rows,n_in,n_out", [
    (1, 64, 4), (2, 2560, 2560), (1, 1, 1), (3, 63, 5), (5, 65, 7), (7, 130, 9), (16, 200, 33),
    (4, 6912, 2560 // 4 + 3), (9, 127, 258), (1, 6912, 1),
])
def test_packed_kernel_equals_the_int8_product(rows, n_in, n_out):
    rng = np.random.default_rng(rows * 1000 + n_in + n_out)
    x = rng.integers(-128, 128, (rows, n_in), dtype=np.int8)  # full range, -128 included
    codes = rng.integers(-1, 2, (n_out, n_in), dtype=np.int8)
    packed = packing.pack_2bit(codes)
    ours = np.asarray(jax.jit(cpu_decode.ternary_dot, static_argnums=2)(
        jnp.asarray(x), jnp.asarray(packed), n_out))
    np.testing.assert_array_equal(ours, int8_reference(x, codes))


@needs_kernel
def test_leading_axes_and_the_fallback_above_max_rows_agree():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (70, 96), dtype=np.int8)
    packed = jnp.asarray(packing.pack_2bit(codes))
    for shape in [(2, 1, 96), (3, 11, 96)]:  # 2 rows: the kernel; 33: unpack + int8 path
        x = rng.integers(-128, 128, shape, dtype=np.int8)
        np.testing.assert_array_equal(
            np.asarray(cpu_decode.ternary_dot_or_xla(jnp.asarray(x), packed, 70)),
            int8_reference(x, codes))


def test_the_environment_switch_turns_the_kernel_off():
    code = ("from bitnet_jax.core import cpu_decode; "
            "print(cpu_decode.available(), cpu_decode.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "BITNET_JAX_CPU_INT8": "0"})
    assert out.stdout.strip() == "False disabled by BITNET_JAX_CPU_INT8"


@needs_kernel
@pytest.mark.parametrize("precision", ["b1.58", "b1.58@channel", "b1"])
def test_packed_decoding_reads_the_bytes_and_equals_the_int8_model(precision, monkeypatch):
    import flax.linen as nn

    from bitnet_jax.core.precision import get_recipe
    from bitnet_jax.infer import generate as inference
    from bitnet_jax.model.transformer import ModelConfig, init_params

    config = ModelConfig(vocab_size=97, d_model=72, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=130, max_seq_len=32, dtype="float32")
    recipe = get_recipe(precision)
    params = nn.unbox(init_params(config, recipe, jax.random.PRNGKey(1)))
    calls = []
    real = cpu_decode.ternary_dot
    monkeypatch.setattr(cpu_decode, "ternary_dot",
                        lambda *a: calls.append(a[2]) or real(*a))
    packed = inference.make_generator(params, config, recipe, "packed", True)
    int8 = inference.make_generator(params, config, recipe, "int8", True)
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 97)
    np.testing.assert_array_equal(np.asarray(packed.full_logits(tokens)),
                                  np.asarray(int8.full_logits(tokens)))
    assert len(calls) == 7 * config.n_layers  # every decoder linear took the packed kernel
    prompt = [[5, 6, 7]]
    assert inference.generate(packed, prompt, 6).tokens[0].tolist() == \
        inference.generate(int8, prompt, 6).tokens[0].tolist()


@needs_kernel
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 1, 1), (2, 2560, 640), (3, 130, 77),
                                             (5, 6912, 33), (16, 64, 1000)])
def test_bf16_kernel_equals_the_float32_accumulated_dot(rows, n_in, n_out):
    rng = np.random.default_rng(rows + n_in + n_out)
    x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n_in, n_out)) * 0.02, jnp.bfloat16)
    ours = np.asarray(jax.jit(cpu_decode.bf16_dot)(x, w))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)  # bf16 products are exact
    # Only the order of float32 sums differs from a float64 reference: ~n_in ulps at most.
    bound = n_in * np.finfo(np.float32).eps * (np.abs(np.asarray(x, np.float64))
                                               @ np.abs(np.asarray(w, np.float64)))
    assert np.all(np.abs(ours - exact) <= bound + 1e-30)
    xla = np.asarray(jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32))
    np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5 * np.abs(xla).max())


@needs_kernel
def test_bf16_decoding_takes_the_kernel_and_matches_xla(monkeypatch):
    import flax.linen as nn

    from bitnet_jax.core.precision import get_recipe
    from bitnet_jax.infer import generate as inference
    from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params

    config = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=160,
                         max_seq_len=32, dtype="bfloat16", norm_placement="pre")
    recipe = get_recipe("bf16")
    params = nn.unbox(init_params(config, recipe, jax.random.PRNGKey(2)))
    calls = []
    real = cpu_decode.bf16_dot
    monkeypatch.setattr(cpu_decode, "bf16_dot", lambda *a: calls.append(1) or real(*a))
    generator = inference.make_generator(params, config, recipe, "float")
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 97)
    ours = np.asarray(generator.full_logits(tokens))
    assert len(calls) == 7 * config.n_layers + 1  # the decoder linears and the untied head
    xla = np.asarray(Transformer(generator.config, recipe).apply({"params": generator.params},
                                                                  tokens))
    # bf16 activations: a different float32 summation order can flip a bf16 rounding.
    np.testing.assert_allclose(ours, xla, atol=0.05 * np.abs(xla).max())
