"""GGUF export checked against llama.cpp itself (llama-cpp-python).

Tolerances: the float export of an unquantized model agrees to float32 rounding (1e-4 of the
largest logit). Quantized recipes agree to 1% of the largest logit: the ternary codes (and, on
`bitnet`, the scales) are exact, but we quantize each token's activations to 8 bits (absmax)
while llama.cpp multiplies TQ weights with Q8_K activations (8 bits per 256-value block) and
float weights with float16 activations.
"""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core.precision import get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.infer import generate as inference
from bitnet_jax.interop import gguf as gguf_export
from bitnet_jax.interop.run_dir import ModelBundle, save_run
from bitnet_jax.model.transformer import ModelConfig, Transformer, init_params

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

PROMPTS = [b"The quick brown fox", b"ternary weights, 8-bit activations"]
NEW_TOKENS = 8


def tiny(**changes) -> ModelConfig:
    base = dict(vocab_size=320, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                max_seq_len=128, norm_placement="subln", tie_embeddings=True, dtype="float32")
    return ModelConfig(**{**base, **changes})


def bundle(config: ModelConfig, precision: str, seed: int = 0) -> ModelBundle:
    params = jax.tree.map(np.asarray, nn.unbox(init_params(config, get_recipe(precision),
                                                           jax.random.PRNGKey(seed))))
    # Sharper logits than a random init's (near ties would make greedy decoding a coin toss).
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 50
    return ModelBundle(config, precision, params, "bytes")


def llama(path):
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)


CASES = [  # (precision, norm placement, tied, --type, relative logit tolerance)
    ("b1.58", "subln", True, "tq2_0", 1e-2),
    ("b1.58", "subln", True, "tq1_0", 1e-2),
    ("b1.58", "subln", True, "f16", 1e-2),
    ("b1.58", "pre", False, "tq2_0", 1e-2),
    ("b1.58@channel", "pre", True, "tq1_0", 1e-2),
    ("bf16", "pre", False, "f32", 1e-4),
]


@pytest.mark.slow
@pytest.mark.parametrize("precision,norms,tied,qtype,tolerance", CASES)
def test_llama_cpp_runs_the_export_like_we_do(tmp_path, precision, norms, tied, qtype,
                                              tolerance):
    config = tiny(norm_placement=norms, tie_embeddings=tied)
    model = bundle(config, precision)
    summary = gguf_export.export_gguf(model, tmp_path / "m.gguf", qtype)
    assert summary["architecture"] == ("bitnet" if norms == "subln" else "llama")
    llm = llama(tmp_path / "m.gguf")
    try:
        generator = inference.make_generator(model.params, config, model.recipe, "float")
        for text in PROMPTS:
            tokens = llm.tokenize(text, add_bos=False, special=False)
            assert tokens == list(text)  # llama.cpp tokenizes as our byte tokenizer does
            ours = np.asarray(Transformer(config, model.recipe).apply(
                {"params": model.params}, jnp.asarray([tokens])))[0]
            llm.reset()
            llm.eval(tokens)
            theirs = np.asarray(llm.scores[:len(tokens)])
            scale = np.abs(ours).max()
            assert np.abs(ours - theirs).max() <= tolerance * scale
            ours_greedy = inference.generate(generator, [tokens], NEW_TOKENS).tokens[0]
            llm.reset()
            theirs_greedy = []
            for token in llm.generate(tokens, temp=0.0, reset=True):
                theirs_greedy.append(token)
                if len(theirs_greedy) == NEW_TOKENS:
                    break
            assert theirs_greedy == ours_greedy.tolist()
    finally:
        llm.close()


@pytest.mark.slow
def test_a_trained_bpe_tokenizer_tokenizes_the_same_in_llama_cpp(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bitnet_jax.data.tokenizers import BPE_SPECIAL_TOKEN, HFTokenizer

    # Trained as `bitnet tokenizer train` trains (data.tokenizers.train_bpe).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BPE_SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "ternary weights and 8-bit activations, it's the llama's 123 tokens"
    tokenizer.train_from_iterator([text] * 50, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    config = tiny(vocab_size=320)
    model = bundle(config, "b1.58")
    model.tokenizer = str(path)
    gguf_export.export_gguf(model, tmp_path / "m.gguf", "tq2_0")
    ours = HFTokenizer(path)
    llm = llama(tmp_path / "m.gguf")
    try:
        for text in ["ternary weights and  8-bit activations", "it's the llama's 123 tokens!"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                ours.encode(text).tolist()
    finally:
        llm.close()


@pytest.mark.parametrize("changes,precision,qtype,reason", [
    (dict(norm_placement="bitlinear"), "b1.58", "tq2_0", "own RMSNorm scale"),
    (dict(ffn_activation="relu2"), "b1.58", "tq2_0", "SiLU"),
    (dict(tie_embeddings=False), "b1.58", "tq2_0", "untied head"),
    (dict(head_dim=32), "b1.58", "tq2_0", "square q_proj"),
    ({}, "a4.8", "f16", "KV cache"),
    ({}, "v2-a8", "f16", "Hadamard"),
    ({}, "w1.58a4", "f16", "below 8-bit"),
    ({}, "bf16", "tq2_0", "not"),
    ({}, "b1.58@g128", "tq2_0", "per-group"),
    (dict(d_ff=320), "b1.58", "tq1_0", "256 inputs a block"),
])
def test_architectures_llama_cpp_cannot_run_are_refused_in_one_line(changes, precision, qtype,
                                                                    reason):
    with pytest.raises(ConfigError, match=reason) as error:
        gguf_export.gguf_architecture(tiny(**changes), get_recipe(precision), qtype)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_cli_export_gguf_writes_a_file_llama_cpp_loads_and_refuses_in_one_line(tmp_path):
    model = bundle(tiny(), "b1.58")
    run = save_run(model, tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.cli", "export-gguf", str(run),
                          str(tmp_path / "m.gguf"), "--type", "tq2_0"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "llama.cpp bitnet" in out.stdout
    llama(tmp_path / "m.gguf").close()
    refused = save_run(bundle(tiny(ffn_activation="relu2"), "b1.58"), tmp_path / "relu2")
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.cli", "export-gguf", str(refused),
                          str(tmp_path / "r.gguf")], capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]  # earlier lines: library warnings on loading
    assert out.returncode == 2 and last.startswith("error: ") and "SiLU" in last


@pytest.mark.parametrize("weights", ["int8", "packed"])
def test_stored_inference_weights_export_the_same_file_as_float_kernels(tmp_path, weights):
    config = tiny(dtype="float32")
    model = bundle(config, "b1.58")
    stored = inference.inference_params(model.params, model.recipe, weights, jnp.float32)
    from_float = gguf_export.export_gguf(model, tmp_path / "float.gguf", "tq2_0")
    from_stored = gguf_export.export_gguf(ModelBundle(config, "b1.58", stored, "bytes"),
                                          tmp_path / "stored.gguf", "tq2_0")
    assert (tmp_path / "float.gguf").read_bytes() == (tmp_path / "stored.gguf").read_bytes()
    assert from_float["bytes"] == from_stored["bytes"]
