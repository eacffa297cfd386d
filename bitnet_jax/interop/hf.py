"""Hugging Face BitNet interop: our models to and from transformers' `BitNetForCausalLM`.

`BitNetForCausalLM` is our `subln` layout (LLaMA blocks plus `attn_sub_norm` before o_proj and
`ffn_sub_norm` before down_proj), rotate-half RoPE, bias-free linears. Its weights come in the
forms that `config.json`'s `quantization_config` names:

- none: plain `nn.Linear`, float weights = our precision `bf16`;
- `autobitlinear` + `online`: float weights quantized on the fly (per-tensor absmean ternary,
  8-bit per-token absmax inputs) = our `b1.58`, latent weights kept (can train on);
- `bitlinear` + `offline` (microsoft/bitnet-b1.58-2B-4T): ternary codes packed 2 bits each,
  `weight` uint8 (out/4, in), and `weight_scale` = 1 / gamma, since BitLinear divides by it;
- `autobitlinear` + `offline`: ternary codes (as floats, or packed) and `weight_scale` = gamma,
  since AutoBitLinear multiplies by it (import only).

`export_hf` writes the first two (or the packed one with `packed=True`); `load_hf` reads all
four. Ternary codes come back as float weights that our absmean quantizer maps to exactly those
codes and scale (`codec.exact_latent`), so an imported packed model is the same model, exports
to the same codes, and training can go on from it. Embeddings and the LM head stay full
precision on both sides: transformers' quantizer skips the output embedding (and tied weights)
by default.

Numerics: in float32 the two implementations agree to ~1e-6 in the logits:
`quant.absmax_per_token` forms the activation scale as `(1 / absmax) * 127`, the way torch
evaluates the reference's `127 / absmax`, so 8-bit codes agree on ties that scale decides. An
activation exactly on a .5 tie by construction (bf16 weights make those likely: an entry half
its row's largest) still rounds by the last ulp of the RMSNorm, where jnp.mean and torch's
mean and rsqrt may differ: one code, ~1e-3 in later logits (see tests/test_hf.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from bitnet_jax.core import codec
from bitnet_jax.core.precision import PRESETS, get_recipe
from bitnet_jax.data.tokenizers import EOD_TOKENS, ByteTokenizer
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.run_files import TOKENIZER_FILE
from bitnet_jax.interop.run_dir import (ModelBundle, fresh_directory, save_run,
                                        tokenizer_file)
from bitnet_jax.model.linears import DECODER_LINEARS, kernel_path
from bitnet_jax.model.transformer import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUR_KEY = "bitnet_jax"  # our own record in config.json; transformers keeps it as an attribute
VALUES_PER_BYTE = 4  # ternary codes per packed byte (transformers' VALUES_PER_ITEM)

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Our FFN activation <-> transformers' `hidden_act` (SwiGLU is a SiLU-gated MLP there).
HF_ACTIVATION = {"swiglu": "silu", "relu2": "relu2"}
FROM_HF_ACTIVATION = {"silu": "swiglu", "swish": "swiglu", "relu2": "relu2"}
DEFAULT_ROPE_THETA = 500_000.0  # BitNetConfig.default_theta, used when config.json has none

# Weight formats (see the module docstring), named after what `load_hf` must do with them.
FLOAT, ONLINE, BITLINEAR, AUTOBITLINEAR = "float", "online", "bitlinear", "autobitlinear"
QUANTIZATION_CONFIGS = {
    ONLINE: {"quant_method": "bitnet", "linear_class": "autobitlinear",
             "quantization_mode": "online"},
    BITLINEAR: {"quant_method": "bitnet", "linear_class": "bitlinear",
                "quantization_mode": "offline"},
}
# The subln block's norms: their path in a layer and the ModelConfig size of their scale.
BLOCK_NORMS = ((("input_layernorm",), "d_model"), (("post_attention_layernorm",), "d_model"),
               (("self_attn", "attn_sub_norm"), "q_dim"), (("mlp", "ffn_sub_norm"), "d_ff"))


# ----------------------------------------------------------------------------------------------
# What BitNetForCausalLM can express.

def precision_kind(precision: str) -> str | None:
    """"bf16" or "b1.58" when `precision` is that recipe (under any name), else None.

    Compared by content, so `w16a16`, `w1.58a8` and `b1.58@tensor` count too.
    """
    try:
        recipe = get_recipe(precision)
    except ValueError as error:
        raise ConfigError(f"precision: {error}") from None
    for kind in ("bf16", "b1.58"):
        if recipe.roles == PRESETS[kind].roles and recipe.kv_cache is None:
            return kind
    return None


def check_exportable(config: ModelConfig, precision: str, packed: bool = False) -> None:
    """Raise ConfigError naming the first reason BitNetForCausalLM cannot hold this model."""
    require(config.norm_placement == "subln",
            f"model.norm_placement={config.norm_placement!r}: BitNetForCausalLM has the 'subln' "
            f"layout only (attn_sub_norm and ffn_sub_norm inside pre-norm blocks)")
    require(config.q_dim == config.d_model,
            f"n_heads * head_dim = {config.q_dim} differs from d_model = {config.d_model}: "
            f"BitNetForCausalLM derives head_dim = hidden_size // num_attention_heads and its "
            f"attn_sub_norm has hidden_size features")
    kind = precision_kind(precision)
    require(kind is not None,
            f"precision {precision!r}: BitNetForCausalLM runs 'bf16' (no quantization) or "
            f"'b1.58' (per-tensor ternary weights, 8-bit per-token absmax activations in every "
            f"linear) only; per-channel/group scales, other bit widths, a4.8, BitNet v2 and "
            f"KV-cache quantization have no equivalent there")
    if packed:
        require(kind == "b1.58",
                f"packed export stores ternary weights; precision {precision!r} is not ternary "
                f"(export it unpacked)")
        outs = {"q_proj": config.q_dim, "k_proj/v_proj": config.kv_dim,
                "o_proj/down_proj": config.d_model, "gate_proj/up_proj": config.d_ff}
        odd = {name: n for name, n in outs.items() if n % VALUES_PER_BYTE}
        require(not odd,
                f"packed export: transformers' BitLinear holds out_features // 4 packed rows, so "
                f"every output size must be a multiple of 4; {odd} are not (export unpacked)")


def _eos_token_id(tokenizer: str) -> int | None:
    """Our end-of-document id, which generation should stop at (None if there is none)."""
    if tokenizer == "bytes":
        return ByteTokenizer.eod_id
    from tokenizers import Tokenizer

    path = tokenizer_file(tokenizer)
    require(path.is_file(), f"tokenizer {tokenizer!r}: no such file")
    vocab = Tokenizer.from_file(str(path))
    ids = [vocab.token_to_id(t) for t in EOD_TOKENS if vocab.token_to_id(t) is not None]
    return int(ids[0]) if ids else None


def hf_config(config: ModelConfig, precision: str, packed: bool = False,
              dtype: str = "float32", tokenizer: str = "bytes") -> dict:
    """The config.json of `config` as a BitNetForCausalLM (checks that it can be one)."""
    check_exportable(config, precision, packed)
    require(dtype in EXPORT_DTYPES, f"dtype={dtype!r}; choose one of {list(EXPORT_DTYPES)}")
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    hf = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_act": HF_ACTIVATION[config.ffn_activation],
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],  # transformers 4.x reads this one
        "bos_token_id": None,  # we train without BOS; BitNetConfig's default is Llama 3's
        "eos_token_id": _eos_token_id(tokenizer),
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name before transformers 5
        OUR_KEY: {"tokenizer": "bytes" if tokenizer == "bytes" else TOKENIZER_FILE},
    }
    if precision_kind(precision) == "b1.58":
        hf["quantization_config"] = dict(QUANTIZATION_CONFIGS[BITLINEAR if packed else ONLINE])
    return hf


# ----------------------------------------------------------------------------------------------
# Parameter names: one table serves both directions.

@dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in our parameter tree.

    kind: "linear" (a BitLinear kernel, HF (out, in) = our (in, out) transposed; ternary in the
    quantized formats), "head" (the untied LM head, transposed, never quantized) or "plain".
    `shape` is our parameter's shape (the HF tensor's, transposed for linears and the head).
    """

    hf_name: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str = "plain"

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.kind in ("linear", "head") else self.shape


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every parameter of `Transformer(config)` in the subln layout, with its HF name."""
    d, vocab = config.d_model, config.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens", "embedding"), (vocab, d))]
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}"
        for path, size in BLOCK_NORMS:
            specs.append(TensorSpec(f"{prefix}.{'.'.join(path)}.weight",
                                    (f"layers_{i}", *path, "scale"), (getattr(config, size),)))
        for linear in DECODER_LINEARS:
            specs.append(TensorSpec(f"{prefix}.{linear.parent}.{linear.name}.weight",
                                    kernel_path(i, linear), linear.shape(config), "linear"))
    specs.append(TensorSpec("model.norm.weight", ("norm", "scale"), (d,)))
    if not config.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), (d, vocab), "head"))
    return specs


def _scale_name(weight_name: str) -> str:
    return weight_name.removesuffix("weight") + "weight_scale"


# ----------------------------------------------------------------------------------------------
# Ternary linears: our float kernel (in, out) <-> codes and scales in HF (out, in) layout.

def pack_kernel(kernel_IxO: Any, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """BitLinear's (weight, weight_scale) for one of our kernels: the codes our model uses,
    packed 2 bits each (transformers' layout), and 1 / gamma (BitLinear divides by it).

    Quantized as our forward pass does (`codec.ternary_codes`).
    """
    codes_OxI, gamma = codec.ternary_codes(kernel_IxO)
    inverse = np.float32(1.0) / gamma
    return codec.pack_codes(codes_OxI, "2bit"), inverse.reshape(1).astype(dtype)


def _ternary_codes(name: str, weight: np.ndarray, shape: tuple[int, int],
                   fmt: str) -> np.ndarray:
    """Codes (out, in) of a stored ternary weight: packed uint8, or ternary values as floats."""
    out_features, in_features = shape
    if weight.dtype == np.uint8:
        rows = -(-out_features // VALUES_PER_BYTE)
        require(weight.shape == (rows, in_features),
                f"{name}: packed uint8 weight of shape {weight.shape}; a ({out_features}, "
                f"{in_features}) linear packs to ({rows}, {in_features})")
        try:
            return codec.unpack_codes(weight, shape, "2bit")
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
    require(fmt == AUTOBITLINEAR,
            f"{name}: BitLinear checkpoints hold packed uint8 weights, got {weight.dtype}")
    require(weight.shape == shape, f"{name}: shape {weight.shape}, expected {shape}")
    values = weight.astype(np.float32)
    require(bool(np.all(np.isin(values, (-1.0, 0.0, 1.0)))),
            f"{name}: an offline AutoBitLinear weight must hold ternary values (-1, 0, 1)")
    return values.astype(np.int8)


def _gamma(name: str, weight_scale: np.ndarray, fmt: str) -> np.float32:
    """Our per-tensor scale gamma from a stored weight_scale (BitLinear keeps 1 / gamma)."""
    require(weight_scale.size == 1,
            f"{name}: weight_scale has shape {weight_scale.shape}; only one scale per tensor "
            f"(shape (1,)) is supported")
    value = np.float32(weight_scale.astype(np.float32).reshape(()))
    require(bool(np.isfinite(value)) and value > 0,
            f"{name}: weight_scale must be positive and finite, got {value}")
    return np.float32(1.0) / value if fmt == BITLINEAR else value


# ----------------------------------------------------------------------------------------------
# Export.

def hf_tensors(bundle: ModelBundle, packed: bool = False,
               dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The safetensors contents of `bundle` as a BitNetForCausalLM, and the bytes its linear
    weights take (`linear`) next to what they would take in bf16 (`linear_bf16`)."""
    out_dtype = EXPORT_DTYPES[dtype]
    tensors: dict[str, np.ndarray] = {}
    sizes = {"linear": 0, "linear_bf16": 0}
    params = traverse_util.flatten_dict(bundle.params)
    for spec in tensor_specs(bundle.config):
        value = np.asarray(params[spec.path], np.float32)
        if spec.kind == "linear" and packed:
            weight, scale = pack_kernel(value, out_dtype)
            tensors[spec.hf_name], tensors[_scale_name(spec.hf_name)] = weight, scale
            sizes["linear"] += weight.nbytes + scale.nbytes
        else:
            # Rows go out as they are, q/k included: both sides rotate halves in RoPE
            # (transformers' rotate_half, our apply_rope), so no permutation is needed.
            if spec.kind in ("linear", "head"):
                value = value.T
            tensors[spec.hf_name] = np.ascontiguousarray(value.astype(out_dtype))
            if spec.kind == "linear":
                sizes["linear"] += tensors[spec.hf_name].nbytes
        if spec.kind == "linear":
            sizes["linear_bf16"] += value.size * 2
    return tensors, sizes


def _export_format(precision: str, packed: bool) -> str:
    if precision_kind(precision) == "bf16":
        return FLOAT
    return BITLINEAR if packed else ONLINE


def export_hf(bundle: ModelBundle, out_dir: str | Path, packed: bool = False,
              dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write `bundle` as a transformers BitNetForCausalLM directory (config.json,
    model.safetensors and the tokenizer.json, if any); returns a summary.

    Unpacked, a b1.58 model keeps its float (latent) weights and transformers quantizes them
    on the fly ("online"); packed, it stores the ternary codes 2 bits each, as the released
    microsoft/bitnet-b1.58-2B-4T does. `dtype` is that of the float tensors (bf16 halves them,
    rounding the weights: the exact model is float32).
    """
    config = hf_config(bundle.config, bundle.precision, packed, dtype, bundle.tokenizer)
    tensors, sizes = hf_tensors(bundle, packed, dtype)
    out_dir, tokenizer = fresh_directory(out_dir, overwrite, bundle.tokenizer)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # "format": "pt" is what transformers expects in the header of a checkpoint it loads.
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    files = [CONFIG_FILE, WEIGHTS_FILE] + ([TOKENIZER_FILE] if tokenizer != "bytes" else [])
    return {
        "out_dir": str(out_dir),
        "files": files,
        "format": _export_format(bundle.precision, packed),
        "dtype": dtype,
        "bytes": sum((out_dir / f).stat().st_size for f in files),
        "linear_weight_bytes": sizes["linear"],
        "linear_weight_bytes_bf16": sizes["linear_bf16"],
    }


# ----------------------------------------------------------------------------------------------
# Import.

def read_hf_config(hf_dir: Path) -> dict:
    require(hf_dir.is_dir(), f"{hf_dir}: no such directory")
    path = hf_dir / CONFIG_FILE
    require(path.is_file(), f"{hf_dir} has no {CONFIG_FILE}; pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    require(config.get("model_type") == "bitnet",
            f"{path}: model_type={config.get('model_type')!r}; only 'bitnet' "
            f"(BitNetForCausalLM) models can be imported")
    return config


def weight_format(hf: dict, where: str = CONFIG_FILE) -> str:
    """FLOAT, ONLINE, BITLINEAR or AUTOBITLINEAR, from `quantization_config` as transformers
    reads it (BitNetQuantConfig defaults: bitlinear, offline; `bitlinear` is packed either way)."""
    qc = hf.get("quantization_config")
    if not qc:
        return FLOAT
    require(qc.get("quant_method") == "bitnet",
            f"{where}: quantization_config.quant_method={qc.get('quant_method')!r}; only "
            f"'bitnet' (ternary) quantization can be imported")
    require(not qc.get("use_rms_norm", False),
            f"{where}: quantization_config.use_rms_norm=true adds an RMSNorm inside every "
            f"linear on top of the sub-norms, which our 'subln' layout does not have")
    skipped = qc.get("modules_to_not_convert")
    if skipped is not None:
        # Anything but the head and the embeddings left in float would need a mixed recipe.
        names = {m.removesuffix(".weight") for m in skipped}
        require("lm_head" in names and names <= {"lm_head", "model.embed_tokens"},
                f"{where}: quantization_config.modules_to_not_convert={skipped}; importable "
                f"models quantize every block linear and keep lm_head in float")
    linear_class = qc.get("linear_class", "bitlinear")
    mode = qc.get("quantization_mode", "offline")
    require(linear_class in ("bitlinear", "autobitlinear") and mode in ("online", "offline"),
            f"{where}: quantization_config linear_class={linear_class!r}, "
            f"quantization_mode={mode!r} are not ones transformers knows")
    if linear_class == "bitlinear":
        return BITLINEAR
    return ONLINE if mode == "online" else AUTOBITLINEAR


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE base as transformers resolves it: rope_scaling, rope_parameters, rope_theta."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type == "default",
            f"{where}: rope_type={rope_type!r}; only plain RoPE ('default') can be imported")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    require(partial == 1.0, f"{where}: partial_rotary_factor={partial}; only full rotary "
                            f"embeddings can be imported")
    return float(rope.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA)))


def model_config_from_hf(hf: dict, dtype: str | None = None,
                         where: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for a BitNetConfig dict (BitNetConfig's defaults where keys are missing).

    `dtype` is our compute dtype (default: the framework's); parameters are float32.
    """
    activation = hf.get("hidden_act", "relu2")
    require(activation in FROM_HF_ACTIVATION,
            f"{where}: hidden_act={activation!r}; importable: {sorted(FROM_HF_ACTIVATION)}")
    require(not hf.get("attention_bias", False),
            f"{where}: attention_bias=true; our linears have no biases")
    hidden, heads = hf.get("hidden_size", 2560), hf.get("num_attention_heads", 20)
    head_dim = hf.get("head_dim") or hidden // heads
    require(head_dim * heads == hidden,
            f"{where}: head_dim * num_attention_heads = {head_dim * heads} differs from "
            f"hidden_size = {hidden} (BitNetForCausalLM's attn_sub_norm has hidden_size "
            f"features)")
    fields = {
        "vocab_size": hf.get("vocab_size", 128256), "d_model": hidden,
        "n_layers": hf.get("num_hidden_layers", 30), "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "d_ff": hf.get("intermediate_size", 6912), "head_dim": head_dim,
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "ffn_activation": FROM_HF_ACTIVATION[activation], "norm_placement": "subln",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "rope_theta": _rope_theta(hf, where), "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }
    if dtype is not None:
        fields["dtype"] = dtype
    try:
        return ModelConfig(**fields)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards its index.json names."""
    single, index = hf_dir / WEIGHTS_FILE, hf_dir / INDEX_FILE
    if single.is_file():
        return load_file(str(single))
    require(index.is_file(),
            f"{hf_dir} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; only safetensors "
            f"checkpoints can be imported (re-save others with save_pretrained)")
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        require((hf_dir / shard).is_file(), f"{hf_dir}: shard {shard} named in {INDEX_FILE} "
                                            f"is missing")
        tensors.update(load_file(str(hf_dir / shard)))
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig, fmt: str,
                   where: str = "model.safetensors") -> dict:
    """Our float32 parameter tree from HF tensors in weight format `fmt`."""
    remaining = dict(tensors)
    specs = tensor_specs(config)
    wanted = [s.hf_name for s in specs]
    if fmt in (BITLINEAR, AUTOBITLINEAR):
        wanted += [_scale_name(s.hf_name) for s in specs if s.kind == "linear"]
    missing = [name for name in wanted if name not in remaining]
    require(not missing, f"{where}: missing {len(missing)} tensor(s): {_names(missing)}")
    if config.tie_embeddings:
        remaining.pop("lm_head.weight", None)  # a tied head is the embedding table
    params: dict = {}
    for spec in specs:
        weight = remaining.pop(spec.hf_name)
        shape = spec.shape
        if spec.kind == "linear" and fmt in (BITLINEAR, AUTOBITLINEAR):
            codes = _ternary_codes(spec.hf_name, weight, spec.hf_shape, fmt)
            gamma = _gamma(spec.hf_name, remaining.pop(_scale_name(spec.hf_name)), fmt)
            value = codec.exact_latent(codes.T, gamma)
        else:
            require(jnp.issubdtype(weight.dtype, jnp.floating),
                    f"{spec.hf_name}: dtype {weight.dtype}; float weights expected for "
                    f"{'an unquantized' if fmt == FLOAT else 'an online-quantized'} model")
            value = weight.astype(np.float32)  # bf16 -> f32 is exact
            if spec.kind in ("linear", "head"):
                value = value.T
            require(value.shape == shape, f"{spec.hf_name}: shape {weight.shape} does not fit "
                                          f"config.json (expected {spec.hf_shape})")
        params[spec.path] = jnp.asarray(value)
    require(not remaining, f"{where}: unexpected tensor(s) {_names(sorted(remaining))} for a "
                           f"{fmt} BitNetForCausalLM with this config.json")
    return traverse_util.unflatten_dict(params)


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _import_tokenizer(hf_dir: Path, hf: dict, tokenizer: str | None) -> str:
    """An explicit choice, else the directory's tokenizer.json, else our recorded "bytes"."""
    if tokenizer is not None:
        require(tokenizer == "bytes" or tokenizer_file(tokenizer).is_file(),
                f"tokenizer={tokenizer!r}: use 'bytes' or the path of a tokenizer.json")
        return tokenizer
    if (hf_dir / TOKENIZER_FILE).is_file():
        return str(hf_dir / TOKENIZER_FILE)
    recorded = hf.get(OUR_KEY) or {}
    require(recorded.get("tokenizer") == "bytes",
            f"{hf_dir} has no {TOKENIZER_FILE}; pass tokenizer='bytes' or the path of the "
            f"model's tokenizer.json")
    return "bytes"


def load_hf(hf_dir: str | Path, dtype: str | None = None,
            tokenizer: str | None = None) -> ModelBundle:
    """A BitNetForCausalLM directory (config.json + safetensors) as a ModelBundle.

    Precision "bf16" for a plain model, "b1.58" for any BitNet-quantized one. `dtype` is our
    compute dtype (default: the framework's); parameters come back float32.
    """
    hf_dir = Path(hf_dir).expanduser()
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / CONFIG_FILE)
    config = model_config_from_hf(hf, dtype, where)
    fmt = weight_format(hf, where)
    params = params_from_hf(read_safetensors(hf_dir), config, fmt, str(hf_dir))
    tokenizer = _import_tokenizer(hf_dir, hf, tokenizer)
    if tokenizer == "bytes":
        require(config.vocab_size >= ByteTokenizer.vocab_size,
                f"the byte tokenizer needs vocab_size >= {ByteTokenizer.vocab_size}, "
                f"{where} has {config.vocab_size}")
    return ModelBundle(config, "bf16" if fmt == FLOAT else "b1.58", params, tokenizer)


def import_hf(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
              dtype: str | None = None, tokenizer: str | None = None) -> Path:
    """Import a BitNetForCausalLM directory as a run directory (see `run_dir.save_run`)."""
    bundle = load_hf(hf_dir, dtype, tokenizer)
    return save_run(bundle, out_dir, source=f"hf:{Path(hf_dir).expanduser().resolve()}",
                    overwrite=overwrite)
