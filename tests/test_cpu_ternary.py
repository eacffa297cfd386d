"""The packed ternary kernel equals the int8 product exactly, odd shapes and tails included."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import cpu_ternary, packing

needs_kernel = pytest.mark.skipif(not cpu_ternary.available(),
                                  reason=f"kernel: {cpu_ternary.unavailable_reason()}")


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
    ours = np.asarray(jax.jit(cpu_ternary.ternary_dot, static_argnums=2)(
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
            np.asarray(cpu_ternary.ternary_dot_or_xla(jnp.asarray(x), packed, 70)),
            int8_reference(x, codes))


def test_the_environment_switch_turns_the_kernel_off():
    code = ("from bitnet_jax.core import cpu_ternary; "
            "print(cpu_ternary.available(), cpu_ternary.unavailable_reason())")
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
    real = cpu_ternary.ternary_dot
    monkeypatch.setattr(cpu_ternary, "ternary_dot",
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
