"""Hugging Face BitNet interop: our Transformer and transformers' BitNetForCausalLM give the same
logits for a model exported from here and for one made by transformers and imported, in every
weight format (float, online-quantized, packed BitLinear, offline AutoBitLinear); round trips
keep the packed bytes; what BitNetForCausalLM cannot express is refused with a reason."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights, unpack_weights

from bitnet_jax.interop import run_dir as artifacts
from bitnet_jax.interop import hf
from bitnet_jax.core import matmul, quant
from bitnet_jax.interop.run_dir import ModelBundle
from bitnet_jax.config import load_config
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.train.loop import train

# Float32 logits of two implementations of the same model agree to ~1e-6 here; a wrong layout,
# scale or rounding convention moves them by far more than this.
TOL = 1e-4
# What one 8-bit activation code flipped on an exact .5 tie moves logits by (~4e-3 seen).
ONE_ACTIVATION_CODE = 2e-2
TINY = {"vocab_size": 320, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "d_ff": 160, "max_seq_len": 64, "dtype": "float32"}
TOKENS = np.random.default_rng(0).integers(0, 320, (2, 48))
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def eager_torch():
    """transformers' BitNet quantizers are @torch.compile'd, ~20 s of compiling on a CPU for
    the same arithmetic; run them eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


def our_logits(bundle: ModelBundle) -> np.ndarray:
    config = bundle.config.replace(dtype="float32")
    return np.asarray(Transformer(config, bundle.recipe).apply({"params": bundle.params},
                                                               jnp.asarray(TOKENS)))


def hf_model(hf_dir) -> BitNetForCausalLM:
    return BitNetForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def hf_logits(model: BitNetForCausalLM) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS)).logits.numpy()


def max_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------
# Export: a model trained here runs in transformers.

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> ModelBundle:
    """A b1.58 model with squared-ReLU and tied embeddings, trained a few steps, from its run."""
    out = tmp_path_factory.mktemp("runs")
    base = {"model": {"preset": None, "overrides": {**TINY, "ffn_activation": "relu2",
                                                    "tie_embeddings": True}}}
    overrides = [f"out_dir={out}", "name=run", "precision=b1.58", "train.steps=3",
                 "train.batch_size=4", "data.seq_len=32", "data.max_documents=20",
                 "optimizer.warmup_steps=1", "optimizer.lr=1e-2", "train.eval_every=0",
                 "train.eval_batches=1", "train.checkpoint_every=0", "train.progress=false",
                 "train.peak_flops=1e11", "logging.wandb=disabled"]
    summary = train(load_config(base=base, overrides=overrides), devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    return artifacts.load_run(out / "run")


def untied_swiglu(bundle: ModelBundle, precision: str = "b1.58") -> ModelBundle:
    """The trained weights as a SwiGLU model with its own LM head (same tree plus lm_head)."""
    head = np.random.default_rng(1).normal(0, 0.5, (bundle.config.d_model,
                                                    bundle.config.vocab_size))
    params = {**bundle.params, "lm_head": {"kernel": jnp.asarray(head, jnp.float32)}}
    config = bundle.config.replace(ffn_activation="swiglu", tie_embeddings=False)
    return ModelBundle(config, precision, params, bundle.tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("variant,packed", [("tied", False), ("tied", True), ("untied", False),
                                            ("untied", True), ("bf16", False)])
def test_trained_model_gives_the_same_logits_in_transformers(trained, tmp_path, variant, packed):
    bundle = {"tied": trained, "untied": untied_swiglu(trained),
              "bf16": untied_swiglu(trained, "bf16")}[variant]
    summary = hf.export_hf(bundle, tmp_path / "hf", packed=packed)
    assert summary["files"] == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 256 and config[hf.OUR_KEY] == {"tokenizer": "bytes"}

    model = hf_model(tmp_path / "hf")
    expected_class = {"bf16": torch.nn.Linear}.get(variant, BitLinear if packed else AutoBitLinear)
    assert type(model.model.layers[0].mlp.down_proj) is expected_class
    assert type(model.lm_head) is torch.nn.Linear  # the head stays full precision
    assert model.config.tie_word_embeddings == (variant == "tied")
    ours, theirs = our_logits(bundle), hf_logits(model)
    assert max_diff(ours, theirs) < TOL, max_diff(ours, theirs)
    assert np.abs(ours).max() > 0.1  # not a vacuous comparison

    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (variant != "tied")
    if packed:
        # The bytes are transformers' own pack_weights of the codes our model's forward uses
        # (`matmul.quantize_weight`: on CPUs gamma from our kernel's float64 sum, which can be an
        # ulp from `quant.ternary_absmean`'s float32 one), and weight_scale is 1 / gamma.
        kernel = bundle.params["layers_1"]["self_attn"]["k_proj"]["kernel"]
        codes = matmul.quantize_weight(bundle.recipe.qkv.weight, kernel)
        weight = stored["model.layers.1.self_attn.k_proj.weight"]
        reference = pack_weights(torch.tensor(np.asarray(codes.codes).T.copy()))
        np.testing.assert_array_equal(weight, reference.numpy())
        np.testing.assert_array_equal(stored["model.layers.1.self_attn.k_proj.weight_scale"],
                                      [np.float32(1) / np.float32(codes.scale)])
        assert summary["linear_weight_bytes"] * 7 < summary["linear_weight_bytes_bf16"]


# ----------------------------------------------------------------------------------------------
# Import: a model made by transformers runs here.

def make_hf_dir(path, fmt, tie, dtype=torch.float32, shards=False, activation="relu2"):
    """A random BitNetForCausalLM saved by transformers, then laid out in weight format `fmt`:
    "float", "online", "bitlinear" (packed, as bitnet-b1.58-2B-4T), "autobitlinear" (ternary
    values, weight_scale = gamma) or "autobitlinear-packed"."""
    config = BitNetConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, hidden_act=activation,
                          tie_word_embeddings=tie, initializer_range=0.1,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    torch.manual_seed(0)
    model = BitNetForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn_like(param))
    model.to(dtype).save_pretrained(path, max_shard_size="100KB" if shards else "1GB")
    if fmt == "float":
        return model
    config_json = json.loads((path / "config.json").read_text())
    linear_class = "bitlinear" if fmt == "bitlinear" else "autobitlinear"
    mode = "online" if fmt == "online" else "offline"
    config_json["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                          "quantization_mode": mode}
    (path / "config.json").write_text(json.dumps(config_json))
    if fmt == "online":
        return model
    tensors = {}
    for name, value in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        if name.split(".")[-2] not in LINEAR_NAMES:
            tensors[name] = value.contiguous()
            continue
        w = value.float()  # transformers' WeightQuant
        gamma = w.abs().mean().clamp(min=1e-5)
        codes = (w / gamma).round().clamp(-1, 1)
        if fmt == "autobitlinear":
            tensors[name], scale = codes.to(dtype), gamma
        else:
            tensors[name] = pack_weights(codes.to(torch.int8))
            scale = gamma if fmt == "autobitlinear-packed" else 1.0 / gamma
        tensors[name.removesuffix("weight") + "weight_scale"] = scale.reshape(1).to(dtype)
    for stale in path.glob("model*.safetensors*"):
        stale.unlink()
    torch_save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return model


# Offline AutoBitLinear files are float32 here: transformers 5.23 loads such a bf16 file with
# dtype=float32 leaving some weights in bf16, and its forward pass then fails on mixed dtypes.
@pytest.mark.parametrize("fmt,tie,dtype,shards", [
    ("float", False, torch.float32, True),
    ("float", True, torch.bfloat16, False),
    ("online", False, torch.float32, False),
    ("online", True, torch.bfloat16, True),
    ("bitlinear", True, torch.bfloat16, False),
    ("bitlinear", False, torch.float32, False),
    ("autobitlinear", False, torch.float32, False),
    ("autobitlinear-packed", True, torch.float32, False),
])
def test_transformers_model_gives_the_same_logits_here(tmp_path, fmt, tie, dtype,
                                                       shards):
    make_hf_dir(tmp_path, fmt, tie, dtype, shards)
    assert (tmp_path / "model.safetensors.index.json").exists() == shards
    bundle = hf.load_hf(tmp_path, tokenizer="bytes")
    assert bundle.precision == ("bf16" if fmt == "float" else "b1.58")
    assert bundle.config.tie_embeddings == tie and bundle.config.rope_theta == 1000.0
    assert bundle.config.ffn_activation == "relu2" and bundle.config.dtype == "bfloat16"
    leaves = [bundle.params["embed_tokens"]["embedding"],
              bundle.params["layers_0"]["mlp"]["down_proj"]["kernel"]]
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    ours, theirs = our_logits(bundle), hf_logits(hf_model(tmp_path))
    assert max_diff(ours, theirs) < TOL, max_diff(ours, theirs)
    assert np.abs(ours).max() > 0.1


def test_swiglu_checkpoint_imports_as_swiglu(tmp_path):
    make_hf_dir(tmp_path, "online", tie=False, activation="silu")
    bundle = hf.load_hf(tmp_path, dtype="float32", tokenizer="bytes")
    assert bundle.config.ffn_activation == "swiglu" and bundle.config.dtype == "float32"
    assert max_diff(our_logits(bundle), hf_logits(hf_model(tmp_path))) < TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_import_then_export_keeps_the_packed_weights(tmp_path, dtype):
    """Imported ternary codes come back byte for byte, through a run directory."""
    torch_dtype = getattr(torch, dtype)
    source = tmp_path / "source"
    make_hf_dir(source, "bitlinear", tie=dtype == "bfloat16", dtype=torch_dtype)
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="a"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(source / "tokenizer.json"))

    run_dir = hf.import_hf(source, tmp_path / "run")
    bundle = artifacts.load_run(run_dir)
    direct = hf.load_hf(source)
    assert bundle.config == direct.config and bundle.precision == "b1.58"
    assert bundle.tokenizer == str(run_dir / "tokenizer.json")
    for path, leaf in _leaves(direct.params):
        np.testing.assert_array_equal(np.asarray(_get(bundle.params, path)), np.asarray(leaf))

    # Import is exact: every kernel quantizes to the stored codes and to gamma = 1 / weight_scale.
    before = load_file(str(source / "model.safetensors"))
    for spec in hf.tensor_specs(bundle.config):
        if spec.kind != "linear":
            continue
        stored_codes = unpack_weights(torch.from_numpy(before[spec.hf_name]),
                                      dtype=torch.float32).numpy()
        gamma = np.float32(1.0) / before[spec.hf_name + "_scale"].astype(np.float32).reshape(())
        again = quant.ternary_absmean(_get(bundle.params, spec.path))
        np.testing.assert_array_equal(np.asarray(again.codes).T, stored_codes, spec.hf_name)
        assert np.asarray(again.scale, np.float32) == gamma, spec.hf_name

    hf.export_hf(bundle, tmp_path / "again", packed=True, dtype=dtype)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == \
        (source / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "again" / "config.json").read_text())["eos_token_id"] == 2
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        if name.endswith("weight_scale") and dtype == "float32":
            # gamma is imported exactly as 1 / weight_scale; exporting takes 1 / gamma again,
            # and a float32 reciprocal of a reciprocal can be an ulp away from the start.
            np.testing.assert_array_equal(
                after[name], np.float32(1.0) / (np.float32(1.0) / value), err_msg=name)
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.slow
def test_bf16_exports_load_back_to_the_transformers_model(trained, tmp_path):
    """bf16 files round the weights (and BitLinear's 1/gamma); both sides read the same file.

    Not every logit can agree to TOL here: bf16 values make exact .5 ties in the 8-bit
    activation codes likely (an embedding entry exactly half its row's largest, under equal bf16
    norm gains, gives x * 127 / absmax = 63.5 up to the last ulp of the RMS). Which way such a
    tie rounds depends on that ulp, i.e. on summation order and on torch's rsqrt (not correctly
    rounded on CPU, XLA's is), not on the model; one flipped code moves the later logits of its
    row by ~1e-3. So: the same tensors exactly, logits to TOL at most positions, and no worse
    than one activation code anywhere.
    """
    for packed in (False, True):
        out = tmp_path / str(packed)
        hf.export_hf(trained, out, packed=packed, dtype="bfloat16")
        bundle = hf.load_hf(out)
        assert bundle.tokenizer == "bytes" and bundle.config.tie_embeddings
        model = hf_model(out)
        if not packed:  # float tensors: transformers holds exactly what we imported
            ours, _ = hf.hf_tensors(bundle, dtype="float32")
            theirs = model.state_dict()
            for name, value in ours.items():
                np.testing.assert_array_equal(theirs[name].numpy(), value, err_msg=name)
        per_position = np.abs(our_logits(bundle) - hf_logits(model)).max(axis=-1)
        assert np.mean(per_position < TOL) > 0.9, per_position
        assert per_position.max() < ONE_ACTIVATION_CODE, per_position.max()


# ----------------------------------------------------------------------------------------------
# Refusals and errors.

def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, **changes})


@pytest.mark.parametrize("config,precision,packed,reason", [
    (tiny(norm_placement="pre"), "b1.58", False, "norm_placement='pre'"),
    (tiny(norm_placement="bitlinear"), "bf16", False, "'subln' layout only"),
    (tiny(head_dim=32), "b1.58", False, "differs from d_model"),
    (tiny(), "a4.8", False, "precision 'a4.8'"),
    (tiny(), "b1.58@channel", False, "per-channel"),
    (tiny(), "w2a8", False, "precision 'w2a8'"),
    (tiny(), "v2-a8", False, "BitNet v2"),
    (tiny(), "bf16", True, "not ternary"),
    (tiny(d_ff=162), "b1.58", True, "multiple of 4"),
    (tiny(parametrization="mup", mup_base_d_model=32), "b1.58", False, "parametrization=.mup."),
])
def test_unexpressible_models_are_refused(tmp_path, config, precision, packed, reason):
    with pytest.raises(ConfigError, match=reason):
        hf.check_exportable(config, precision, packed)
    bundle = ModelBundle(config, precision, params={})
    with pytest.raises(ConfigError, match=reason):
        hf.export_hf(bundle, tmp_path / "out", packed=packed)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_equivalent_recipe_names_are_accepted():
    for name in ("b1.58", "w1.58a8", "b1.58@tensor"):
        assert hf.precision_kind(name) == "b1.58"
        hf.check_exportable(tiny(), name, packed=True)
    assert hf.precision_kind("w16a16") == "bf16"
    with pytest.raises(ConfigError, match="unknown precision"):
        hf.precision_kind("b3")


@pytest.mark.parametrize("tie", [False, True])
def test_tensor_table_is_the_parameter_tree(tie):
    """Every parameter of Transformer has exactly one HF tensor, and import checks the shapes
    init_params gives."""
    config = tiny(tie_embeddings=tie)
    tree = nn.unbox(jax.eval_shape(
        lambda: init_params(config, get_recipe("b1.58"), jax.random.PRNGKey(0))))
    ours = {path: leaf.shape for path, leaf in _leaves(tree)}
    specs = hf.tensor_specs(config)
    assert sorted(s.path for s in specs) == sorted(ours)
    assert {s.path: s.shape for s in specs} == ours
    assert len({s.hf_name for s in specs}) == len(specs)
    assert ("lm_head.weight" in {s.hf_name for s in specs}) == (not tie)


def test_hf_config_is_what_bitnet_config_reads():
    config = tiny(rope_theta=12345.0, tie_embeddings=True, ffn_activation="relu2")
    written = hf.hf_config(config, "b1.58", packed=True)
    read = BitNetConfig.from_dict(written)
    assert read.rope_parameters == {"rope_type": "default", "rope_theta": 12345.0}
    assert (read.hidden_size, read.num_key_value_heads, read.intermediate_size) == (64, 2, 160)
    assert read.hidden_act == "relu2" and read.tie_word_embeddings
    assert written["quantization_config"]["linear_class"] == "bitlinear"
    assert "quantization_config" not in hf.hf_config(config, "bf16")
    assert hf.model_config_from_hf(written, dtype="float32") == config


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        hf.load_hf(tmp_path / "nowhere")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        hf.load_hf(tmp_path / "empty")

    good = tmp_path / "good"
    make_hf_dir(good, "bitlinear", tie=False)
    with pytest.raises(ConfigError, match="no tokenizer.json; pass tokenizer='bytes'"):
        hf.load_hf(good)

    def variant(name, edit_config=None, edit_tensors=None):
        path = tmp_path / name
        shutil.copytree(good, path)
        if edit_config:
            config = json.loads((path / "config.json").read_text())
            edit_config(config)
            (path / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(str(path / "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    cases = [
        (variant("llama", lambda c: c.update(model_type="llama")), "model_type='llama'"),
        (variant("bias", lambda c: c.update(attention_bias=True)), "attention_bias"),
        (variant("gelu", lambda c: c.update(hidden_act="gelu")), "hidden_act='gelu'"),
        (variant("yarn", lambda c: c["rope_parameters"].update(rope_type="yarn")),
         "rope_type='yarn'"),
        (variant("norm", lambda c: c["quantization_config"].update(use_rms_norm=True)),
         "use_rms_norm"),
        (variant("skip", lambda c: c["quantization_config"].update(
            modules_to_not_convert=["lm_head", "model.layers.0.mlp.down_proj"])),
         "modules_to_not_convert"),
        (variant("missing", edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
         "missing 1 tensor.*model.layers.1.mlp.up_proj.weight"),
        (variant("extra", edit_tensors=lambda t: t.update(extra=np.zeros(3, np.float32))),
         "unexpected tensor.*extra"),
        (variant("shape", edit_config=lambda c: c.update(intermediate_size=192)),
         r"ffn_sub_norm.weight: shape \(160,\) does not fit config.json \(expected \(192,\)\)"),
        (variant("packed", edit_config=lambda c: c.update(num_key_value_heads=4)),
         r"k_proj.weight: packed uint8 weight of shape \(8, 64\); a \(64, 64\) linear"),
        (variant("string", lambda c: c.update(hidden_size="64")),
         "hidden_size='64' must be an integer"),
        (variant("eps", lambda c: c.update(rms_norm_eps=[1e-5])), "rms_norm_eps=.* a number"),
    ]
    truncated = variant("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases.append((truncated, "safetensors file .* cannot be read"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_bytes(b"\x7fELF\x00\x01")
    cases.append((tmp_path / "garbled", "HF config .*garbled"))
    for path, reason in cases:
        with pytest.raises(ConfigError, match=reason):
            hf.load_hf(path, tokenizer="bytes")

    torch_only = tmp_path / "bin"
    torch_only.mkdir()
    shutil.copy(good / "config.json", torch_only / "config.json")
    with pytest.raises(ConfigError, match="only safetensors"):
        hf.load_hf(torch_only, tokenizer="bytes")
