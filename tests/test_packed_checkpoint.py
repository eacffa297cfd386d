"""Packed ternary checkpoints: exact round trips, sizes, and refusals."""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitnet_jax.model import accounting as compute
from bitnet_jax.infer import generate as inference
from bitnet_jax.core import packing
from bitnet_jax.core import quant
from bitnet_jax.core import codec, matmul
from bitnet_jax.interop import packed as pc
from bitnet_jax.interop import packed_params as pp
from bitnet_jax.interop.run_dir import ModelBundle, abstract_params
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import ModelConfig, Transformer, get_model_config, init_params
from bitnet_jax.core.precision import WeightQuantizer, get_recipe

# Odd sizes on purpose: d_ff = 90 and kv_dim = 24 leave 2-bit padding rows (90 % 4 == 2),
# group size 6 divides every input size (48, 48, 90).
TINY = ModelConfig(vocab_size=67, d_model=48, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=90,
                   max_seq_len=32, dtype="float32")


@functools.cache  # initialising is the slow part; tests never mutate params
def _params(precision, config):
    return nn.unbox(init_params(config, get_recipe(precision), jax.random.PRNGKey(0)))


def _bundle(precision="b1.58", config=TINY, tokenizer="bytes"):
    return ModelBundle(config, precision, _params(precision, config), tokenizer)


def _flat(tree):
    return pc.flat_params(tree)


def _logits(bundle, tokens):
    return Transformer(bundle.config, bundle.recipe).apply({"params": bundle.params}, tokens)


TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, TINY.vocab_size)


# ----------------------------------------------------------------------------------------------
# Round trips.

@pytest.mark.parametrize("layout", packing.LAYOUTS)
@pytest.mark.parametrize("precision", ["b1.58", "b1.58@channel", "b1.58@g6"])
def test_round_trip_is_exact(tmp_path, layout, precision):
    bundle = _bundle(precision)
    pc.save_packed(bundle, tmp_path / "packed", layout, dtype="float32")
    loaded = pp.load_packed(tmp_path / "packed")

    assert loaded.config == bundle.config and loaded.precision == precision
    assert loaded.tokenizer == "bytes"
    assert jax.tree.structure(loaded.params) == jax.tree.structure(bundle.params)
    kernels = pc.quantized_kernels(bundle.params, bundle.recipe)
    assert len(kernels) == 7 * TINY.n_layers
    before, after = _flat(bundle.params), _flat(loaded.params)
    for path, leaf in after.items():
        assert leaf.dtype == jnp.float32 and leaf.shape == before[path].shape, path
        if path in kernels:  # the quantized model is the same, bit for bit
            w = kernels[path]
            q0 = matmul.quantize_weight(w, before[path])  # as the model's forward does
            q1 = matmul.quantize_weight(w, leaf)
            np.testing.assert_array_equal(q1.codes, q0.codes, err_msg=path)
            np.testing.assert_array_equal(q1.scale, q0.scale, err_msg=path)
        else:  # float32 storage: unchanged
            np.testing.assert_array_equal(leaf, before[path], err_msg=path)
    np.testing.assert_allclose(_logits(loaded, TOKENS), _logits(bundle, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_storage_rounds_only_the_unquantized_params(tmp_path):
    bundle = _bundle("b1.58@channel")
    pc.save_packed(bundle, tmp_path / "packed")  # bfloat16 by default
    loaded = pp.load_packed(tmp_path / "packed")
    kernels = pc.quantized_kernels(bundle.params, bundle.recipe)
    before, after = _flat(bundle.params), _flat(loaded.params)
    for path, leaf in after.items():
        if path in kernels:
            w = kernels[path]
            q0 = matmul.quantize_weight(w, before[path])  # as the model's forward does
            q1 = matmul.quantize_weight(w, leaf)
            np.testing.assert_array_equal(q1.codes, q0.codes)
            np.testing.assert_array_equal(q1.scale, q0.scale)
        else:
            expected = np.asarray(before[path]).astype(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(leaf, expected, err_msg=path)
    # The same model as the original with its embeddings, norms and head rounded to bf16.
    rounded = pc.nested_params({p: (v if p in kernels else
                                    jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32))
                                for p, v in _flat(bundle.params).items()})
    np.testing.assert_allclose(
        _logits(loaded, TOKENS), _logits(dataclasses.replace(bundle, params=rounded), TOKENS),
        rtol=1e-5, atol=1e-5)


def test_other_ternary_recipes_and_layouts_round_trip(tmp_path):
    # a4.8 is ternary in every role; inner BitLinear norms and a tied head change the tree.
    config = dataclasses.replace(TINY, norm_placement="bitlinear", tie_embeddings=True)
    bundle = _bundle("a4.8", config)
    pc.save_packed(bundle, tmp_path / "packed", "base3", dtype="float32")
    loaded = pp.load_packed(tmp_path / "packed")
    assert "lm_head" not in loaded.params
    assert "norm" in loaded.params["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(_logits(loaded, TOKENS), _logits(bundle, TOKENS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_can_continue_from_a_loaded_model(tmp_path):
    bundle = _bundle()
    pc.save_packed(bundle, tmp_path / "packed", dtype="float32")
    loaded = pp.load_packed(tmp_path / "packed")

    def loss(params):
        return jnp.mean(Transformer(TINY, loaded.recipe).apply({"params": params}, TOKENS) ** 2)

    grads = jax.jit(jax.grad(loss))(loaded.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_exact_latent_hits_every_scale_exactly():
    rng = np.random.default_rng(0)
    for granularity, group_size in [("tensor", None), ("channel", None), ("group", 32)]:
        for shape in [(64, 160), (160, 64), (96, 33)]:
            w = jnp.asarray(rng.normal(size=shape) * rng.uniform(1e-3, 1.0), jnp.float32)
            w = w.at[:, 0].set(0.0)  # an all-zero column: its scale is clamped to eps
            q = quant.ternary_absmean(w, granularity, group_size)
            latent = codec.exact_latent(q.codes, q.scale, granularity, group_size)
            again = quant.ternary_absmean(jnp.asarray(latent), granularity, group_size)
            np.testing.assert_array_equal(again.codes, q.codes)
            np.testing.assert_array_equal(again.scale, q.scale)
            # The forward's own quantization (on CPUs our kernel) hits them too: sums exact.
            forward = matmul.quantize_weight(WeightQuantizer("ternary", 1.58, granularity,
                                                             group_size), jnp.asarray(latent))
            np.testing.assert_array_equal(forward.codes, q.codes)
            np.testing.assert_array_equal(forward.scale, q.scale)


def test_tokenizer_file_travels_with_the_checkpoint(tmp_path):
    tokenizer = tmp_path / "my_tokenizer.json"
    tokenizer.write_text('{"model": "stub"}')
    bundle = _bundle(tokenizer=str(tokenizer))
    pc.save_packed(bundle, tmp_path / "packed")
    manifest = pc.read_manifest(tmp_path / "packed")
    assert manifest["tokenizer"] == "tokenizer.json"
    loaded = pp.load_packed(tmp_path / "packed")
    assert loaded.tokenizer == str((tmp_path / "packed" / "tokenizer.json").resolve())
    with open(loaded.tokenizer) as f:
        assert f.read() == '{"model": "stub"}'


# ----------------------------------------------------------------------------------------------
# The stored format.

def test_file_layout_and_manifest(tmp_path):
    bundle = _bundle("b1.58@channel")
    report = pc.save_packed(bundle, tmp_path / "packed")
    tensors = load_file(str(tmp_path / "packed" / pc.WEIGHTS_FILE))
    manifest = json.loads((tmp_path / "packed" / pc.MANIFEST_FILE).read_text())
    assert manifest["format"] == pc.FORMAT and manifest["format_version"] == pc.FORMAT_VERSION
    assert manifest["layout"] == "2bit" and manifest["dtype"] == "bfloat16"
    assert manifest["config"] == dataclasses.asdict(TINY) and manifest["size"] == report

    name = "layers_0/mlp/down_proj/kernel"  # Flax (90, 48): torch (out, in) = (48, 90)
    assert manifest["linear"][name]["shape"] == [90, 48]
    assert tensors[name + ".packed"].dtype == np.uint8
    assert tensors[name + ".packed"].shape == (12, 90)
    assert tensors[name + ".scale"].dtype == np.float32
    assert tensors[name + ".scale"].shape == (1, 48)
    # The bytes are transformers' BitNet packing of the (out, in) codes.
    codes = quant.ternary_absmean(_flat(bundle.params)[name], "channel").codes
    np.testing.assert_array_equal(tensors[name + ".packed"],
                                  packing.pack_2bit(np.asarray(codes, np.int8).T))
    assert tensors["embed_tokens/embedding"].dtype == ml_dtypes.bfloat16
    assert tensors["lm_head/kernel"].dtype == ml_dtypes.bfloat16
    assert name not in tensors


def test_base3_stores_flat_out_in_codes(tmp_path):
    bundle = _bundle("b1.58@g6")
    pc.save_packed(bundle, tmp_path / "packed", "base3")
    tensors = load_file(str(tmp_path / "packed" / pc.WEIGHTS_FILE))
    name = "layers_1/self_attn/k_proj/kernel"  # Flax (48, 24)
    assert tensors[name + ".packed"].shape == (-(-48 * 24 // 5),)
    assert tensors[name + ".scale"].shape == (8, 1, 24)
    codes = np.asarray(packing.unpack_base3(tensors[name + ".packed"], (24, 48)))
    expected = quant.ternary_absmean(_flat(bundle.params)[name], "group", 6).codes
    np.testing.assert_array_equal(codes, np.asarray(expected).T)


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_ternary_weights_for_an_inference_engine(tmp_path, layout):
    bundle = _bundle("b1.58@channel")
    pc.save_packed(bundle, tmp_path / "packed", layout)
    weights = pp.load_ternary_weights(tmp_path / "packed")
    assert set(weights) == set(pc.quantized_kernels(bundle.params, bundle.recipe))
    for path, packed in weights.items():
        q = quant.ternary_absmean(_flat(bundle.params)[path], "channel")
        assert packed.codes.dtype == np.int8
        np.testing.assert_array_equal(packed.codes, np.asarray(q.codes).T)
        np.testing.assert_array_equal(packed.scale, q.scale)
        np.testing.assert_array_equal(packed.quantized().dequantize(), q.dequantize())


@pytest.mark.parametrize("weights", pp.INFERENCE_WEIGHTS)
def test_inference_params_run_the_stored_weight_model(tmp_path, weights):
    if "weights" not in {f.name for f in dataclasses.fields(Transformer)}:
        pytest.skip("this Transformer has no stored-weight mode")
    bundle = _bundle("b1.58@channel")
    pc.save_packed(bundle, tmp_path / "packed", "base3", dtype="float32")
    info, params = pp.load_inference_params(tmp_path / "packed", weights)
    assert info.config == TINY and info.params is None
    model = Transformer(TINY, bundle.recipe, weights=weights)
    expected = jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), TOKENS)["params"])))
    assert jax.tree.map(jnp.shape, params) == expected
    np.testing.assert_allclose(model.apply({"params": params}, TOKENS), _logits(bundle, TOKENS),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["auto", "int8", "packed", "float"])
def test_load_generator_reads_stored_weights_straight_from_the_file(tmp_path, monkeypatch,
                                                                     weights):
    bundle = _bundle("b1.58@channel")
    pc.save_packed(bundle, tmp_path / "packed", "2bit")
    want = inference.make_generator(pp.load_packed(tmp_path / "packed").params, TINY,
                                    bundle.recipe, weights, kv_bits=4, dtype="bfloat16")
    if weights != "float":  # no float kernels are rebuilt only to be quantized again
        def refuse(*args, **kwargs):
            raise AssertionError("load_packed called")
        monkeypatch.setattr(pp, "load_packed", refuse)
    loaded, got = inference.load_generator(tmp_path / "packed", weights, kv_bits=4,
                                           dtype="bfloat16")
    assert (loaded.params is None) == (weights != "float")
    assert (got.config, got.recipe, got.weights, got.integer) == \
        (want.config, want.recipe, want.weights, want.integer)
    assert jax.tree.structure(got.params) == jax.tree.structure(want.params)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ----------------------------------------------------------------------------------------------
# Sizes.

@pytest.mark.parametrize(("layout", "low", "high"), [("2bit", 7.5, 8.0), ("base3", 9.5, 10.0)])
def test_packed_linear_weights_are_8x_and_10x_smaller(layout, low, high):
    # ladder-3.2m: d_model 256, d_ff 704, 4 layers. Shapes only, nothing allocated.
    config = get_model_config("ladder-3.2m")
    recipe = get_recipe("b1.58")
    report = pc.size_report(abstract_params(config, recipe), layout, precision="b1.58")
    assert low < report["linear_ratio"] < high
    assert report["linear_weights"] == compute.param_counts(config).linear
    assert report["linear_bf16_bytes"] == 2 * report["linear_weights"]
    # Agrees with the inference memory accounting of compute.py.
    memory = compute.weight_memory(config, recipe)
    assert report["linear_code_bytes"] == memory.linear_bytes[layout]
    assert report["linear_scale_bytes"] == memory.scale_bytes
    assert report["other_bf16_bytes"] == memory.embedding_bytes + memory.norm_bytes
    assert report["file_ratio"] > 1


def test_per_channel_scales_cost_their_float32_bytes():
    config = get_model_config("ladder-3.2m")
    recipe = get_recipe("b1.58@channel")
    report = pc.size_report(abstract_params(config, recipe), "2bit", precision=recipe.name)
    assert report["linear_scale_bytes"] == compute.weight_memory(config, recipe).scale_bytes
    assert 7.0 < report["linear_ratio"] < 7.6


@pytest.mark.parametrize("layout", packing.LAYOUTS)
def test_reported_file_sizes_are_the_real_ones(tmp_path, layout):
    bundle = _bundle("b1.58@g6")
    report = pc.save_packed(bundle, tmp_path / "packed", layout)
    assert report["file_bytes"] == os.path.getsize(tmp_path / "packed" / pc.WEIGHTS_FILE)
    assert pc.size_report(bundle, layout)["file_bytes"] == report["file_bytes"]  # predicted
    # The bf16 reference is the size of a real safetensors file of every parameter in bf16.
    bf16 = {p: np.asarray(v).astype(ml_dtypes.bfloat16) for p, v in _flat(bundle.params).items()}
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    assert report["bf16_file_bytes"] == os.path.getsize(tmp_path / "bf16.safetensors")
    assert report["file_ratio"] == pytest.approx(report["bf16_file_bytes"] / report["file_bytes"])


def test_size_table_for_the_cli():
    config = get_model_config("ladder-3.2m")
    report = pc.size_report(abstract_params(config, get_recipe("b1.58")), "base3",
                            precision="b1.58")
    table = pc.format_size_report(report)
    assert "packed (base3)" in table and "bf16 / packed" in table
    assert f"{report['linear_ratio']:.2f}x" in table and f"{report['file_ratio']:.2f}x" in table
    assert "model.safetensors" in table


# ----------------------------------------------------------------------------------------------
# Refusals.

@pytest.mark.parametrize("precision", ["bf16", "b1", "w4a8", "w2a16", "w8a8@channel"])
def test_refuses_precisions_without_ternary_weights(tmp_path, precision):
    bundle = _bundle(precision)
    with pytest.raises(ConfigError, match="not ternary in every linear role"):
        pc.save_packed(bundle, tmp_path / "packed")
    with pytest.raises(ConfigError, match="not ternary"):
        pc.size_report(bundle)
    assert not (tmp_path / "packed").exists()


def test_a48_is_ternary_and_accepted():
    # a4.8 changes activations and the KV cache only; every weight is ternary.
    assert all(p.weight.kind == "ternary" for p in get_recipe("a4.8").roles.values())
    pc.require_ternary(get_recipe("a4.8"))


def test_refuses_bad_arguments_and_a_full_directory(tmp_path):
    bundle = _bundle()
    with pytest.raises(ConfigError, match="layout"):
        pc.save_packed(bundle, tmp_path / "a", layout="4bit")
    with pytest.raises(ConfigError, match="dtype"):
        pc.save_packed(bundle, tmp_path / "a", dtype="float16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        pc.save_packed(bundle, tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").exists()
    pc.save_packed(bundle, tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "notes.txt").exists()


def test_refuses_directories_that_are_not_packed_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        pp.load_packed(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="not a packed checkpoint"):
        pp.load_packed(tmp_path / "run")
    (tmp_path / "run" / pc.MANIFEST_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError, match="format='something-else'"):
        pp.load_packed(tmp_path / "run")
    (tmp_path / "run" / pc.MANIFEST_FILE).write_text("not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        pp.load_packed(tmp_path / "run")


def _rewrite_manifest(directory, **changes):
    path = directory / pc.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_refuses_unknown_versions_and_missing_or_foreign_tensors(tmp_path):
    bundle = _bundle()
    directory = tmp_path / "packed"
    pc.save_packed(bundle, directory)
    _rewrite_manifest(directory, format_version=pc.FORMAT_VERSION + 1)
    with pytest.raises(ConfigError, match="format_version 2"):
        pp.load_packed(directory)
    _rewrite_manifest(directory, format_version=pc.FORMAT_VERSION)

    path = str(directory / pc.WEIGHTS_FILE)
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if k != "norm/scale"}, path)
    with pytest.raises(ConfigError, match="lacks 1 tensor.*norm/scale"):
        pp.load_packed(directory)
    save_file({**tensors, "extra": np.zeros(3, np.float32)}, path)
    with pytest.raises(ConfigError, match="does not have.*extra"):
        pp.load_packed(directory)
    bad = dict(tensors)
    bad["layers_0/mlp/up_proj/kernel.packed"] = np.full_like(
        tensors["layers_0/mlp/up_proj/kernel.packed"], 0xFF)  # code 3 everywhere
    save_file(bad, path)
    with pytest.raises(ConfigError, match="not valid 2bit data"):
        pp.load_packed(directory)
    wrong = dict(tensors)
    wrong["norm/scale"] = np.zeros(5, ml_dtypes.bfloat16)
    save_file(wrong, path)
    with pytest.raises(ConfigError, match="'norm/scale' is bfloat16\\[5\\]"):
        pp.load_packed(directory)
    # A manifest describing another model: its shapes do not match the file.
    save_file(tensors, path)
    _rewrite_manifest(directory, config={**dataclasses.asdict(TINY), "d_model": 64})
    with pytest.raises(ConfigError):
        pp.load_packed(directory)
    os.remove(path)
    with pytest.raises(ConfigError, match="no model.safetensors"):
        pp.load_packed(directory)
