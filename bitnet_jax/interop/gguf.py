"""GGUF files for llama.cpp: our decoder as its `bitnet` or `llama` architecture.

Written with the `gguf` package (GGUFWriter, and its TQ1_0/TQ2_0/Q8_0 quantizers, which
implement llama.cpp's block layouts). What maps where, read from llama.cpp's own graphs
(src/models/bitnet.cpp and llama.cpp at commit 0c1e570, the one llama-cpp-python 0.3.36 builds):

* `norm_placement="subln"` -> `bitnet`: attn_norm, q/k/v, rotate-half RoPE (NEOX rope type),
  attention, attn_sub_norm, o_proj, ffn_norm, gate/up, ffn_sub_norm, down; the token embedding
  is also the output head (tied only), and q_proj must be square (q_dim == d_model). Each linear
  may carry a per-tensor float32 `.scale` tensor, so ternary codes are stored as they are
  (+-1 in a TQ block has block scale 1) and gamma exactly.
* `norm_placement="pre"` -> `llama`: the LLaMA block; tied or untied head. Its RoPE pairs
  neighbouring features, so q/k rows are permuted as llama.cpp's converter does. It reads no
  scale tensors: gamma goes into TQ's float16 block scales (or into the float weights).
* Both graphs gate the MLP with SiLU at that commit, so `swiglu` only (newer llama.cpp reads
  `bitnet.hidden_activation`; not this one). `bitlinear` (a norm with its own scale inside
  every linear), Hadamard rotations (BitNet v2), quantized KV caches and activations below 8 bits
  have no counterpart and are refused with the reason.

Exactness: ternary codes are exact in every type; gamma is exact on `bitnet` (float32 scale
tensors, per-tensor recipes) and rounded to float16 elsewhere. llama.cpp never quantizes
activations per token as we do: TQ types multiply against Q8_K activations (8-bit absmax per
256-value block), float types against float16/32 activations, so logits agree to a tolerance
(tests/test_gguf.py states it), not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bitnet_jax.core.precision import PrecisionRecipe, WeightQuantizer
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.interop.run_dir import ModelBundle
from bitnet_jax.model.linears import DECODER_LINEARS, DecoderLinear, kernel_path
from bitnet_jax.model.transformer import ModelConfig

__all__ = ["GGUF_TYPES", "HEAD_TYPES", "LLAMA_CPP_COMMIT", "gguf_architecture",
           "export_gguf", "tokenizer_metadata"]

GGUF_TYPES = ("tq1_0", "tq2_0", "f16", "bf16", "f32")
HEAD_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_COMMIT = "0c1e570"  # the llama.cpp these mappings were read from and tested against
QK_K = 256  # values per TQ1_0/TQ2_0 block: every linear's input size must be a multiple

# Our linear name -> llama.cpp's tensor name (blk.{i}.{name}.weight).
_LINEAR_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                 "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                 "down_proj": "ffn_down"}
_BLOCK_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_SUB_NORMS = {("self_attn", "attn_sub_norm"): "attn_sub_norm",
              ("mlp", "ffn_sub_norm"): "ffn_sub_norm"}


def _refusal(config: ModelConfig, recipe: PrecisionRecipe, qtype: str) -> Optional[str]:
    """Why llama.cpp cannot compute this model as we do, or None."""
    where = f"llama.cpp ({LLAMA_CPP_COMMIT})"
    if config.norm_placement == "bitlinear":
        return (f"norm_placement='bitlinear' gives every linear its own RMSNorm scale; {where}'s "
                f"graphs share one norm between q/k/v and between gate/up")
    if config.ffn_activation != "swiglu":
        return (f"ffn_activation={config.ffn_activation!r}: {where}'s bitnet and llama graphs "
                f"gate the MLP with SiLU (swiglu) only")
    if config.norm_placement == "subln":
        if not config.tie_embeddings:
            return f"an untied head: {where}'s bitnet graph uses the token embedding as the head"
        if config.q_dim != config.d_model:
            return (f"q_dim={config.q_dim} != d_model={config.d_model}: {where}'s bitnet graph "
                    f"needs a square q_proj")
    if recipe.kv_cache is not None:
        return f"precision {recipe.name!r} quantizes the KV cache, which {where} does not"
    for role, precision in recipe.roles.items():
        if precision.hadamard:
            return f"precision {recipe.name!r} rotates the {role} inputs (Hadamard); {where} does not"
        act = precision.activation
        if act is not None and (act.bits < 8 or act.keep_ratio < 1.0 or act.kind != "absmax"):
            return (f"precision {recipe.name!r} quantizes {role} inputs below 8-bit absmax; "
                    f"{where} keeps them at 8 bits or more")
        if qtype.startswith("tq"):
            w = precision.weight
            if w is None or w.kind != "ternary":
                return f"{qtype} holds ternary weights; the {role} weights of {recipe.name!r} are not"
            if w.granularity == "group":
                return f"{qtype} has one scale per {QK_K} weights; per-group recipes do not fit"
    if qtype.startswith("tq"):
        for linear in DECODER_LINEARS:
            n_in = linear.shape(config)[0]
            if n_in % QK_K:
                return (f"{qtype} packs {QK_K} inputs a block; {linear.name} has {n_in} "
                        f"(use --type f16)")
    return None


def gguf_architecture(config: ModelConfig, recipe: PrecisionRecipe, qtype: str = "tq2_0") -> str:
    """'bitnet' or 'llama', or ConfigError with the one-line reason llama.cpp cannot run it."""
    require(qtype in GGUF_TYPES, f"--type {qtype!r}; choose one of {GGUF_TYPES}")
    reason = _refusal(config, recipe, qtype)
    if reason is not None:
        raise ConfigError(f"cannot export to GGUF: {reason}")
    return "bitnet" if config.norm_placement == "subln" else "llama"


def _get(params: Any, path: tuple[str, ...]) -> np.ndarray:
    node = params
    for key in path:
        node = node[key]
    return np.asarray(node, np.float32)


def _linear_weight(kernel_IxO: np.ndarray, quantizer: Optional[WeightQuantizer],
                   separate_scale: bool) -> tuple[np.ndarray, Optional[float]]:
    """(weights `(out, in)` float32, per-tensor scale or None): the codes alone where the scale
    can travel as its own tensor, else the dequantized weights codes * scale."""
    if quantizer is None:
        return np.ascontiguousarray(kernel_IxO.T), None
    import jax.numpy as jnp

    from bitnet_jax.core import matmul

    q = matmul.quantize_weight(quantizer, jnp.asarray(kernel_IxO))  # as the forward does
    codes, scale = np.asarray(q.codes, np.float32), np.asarray(q.scale, np.float32)
    if separate_scale and quantizer.granularity == "tensor":
        return np.ascontiguousarray(codes.T), float(scale.reshape(()))
    if q.is_grouped:
        groups = scale.shape[0]
        values = (codes.reshape(groups, -1, codes.shape[-1]) * scale).reshape(codes.shape)
    else:
        values = codes * scale
    return np.ascontiguousarray(values.T), None


def _rope_pairs(weight_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from rotate-half RoPE (feature j pairs with j + H/2) to llama.cpp's
    `llama` RoPE (feature 2j pairs with 2j + 1), as its converter does."""
    out, n_in = weight_OxI.shape
    half = out // n_heads // 2
    return weight_OxI.reshape(n_heads, 2, half, n_in).swapaxes(1, 2).reshape(out, n_in)


def _add_weight(writer, name: str, weight_OxI: np.ndarray, qtype: str) -> None:
    import gguf

    if qtype == "f32":
        writer.add_tensor(name, weight_OxI.astype(np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, weight_OxI.astype(np.float16))
    else:
        ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
        writer.add_tensor(name, gguf.quants.quantize(weight_OxI, ggml_type),
                          raw_dtype=ggml_type)


def _byte_level_tokens(vocab: dict[str, int], size: int) -> list[str]:
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        if index < size:
            tokens[index] = token
    return tokens


def tokenizer_metadata(tokenizer: str, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer fields that make llama.cpp tokenize as we do.

    Both our tokenizers map onto llama.cpp's byte-level BPE ("gpt2" model): the byte tokenizer
    as 256 single-byte tokens and no merges (so every byte is its own id), a byte-level
    tokenizer.json with its vocabulary and merges and GPT-2's pre-tokenizer regex (what
    `ByteLevel(use_regex=True)` splits with). Ids the tokenizer lacks up to `vocab_size` are
    unused padding tokens.
    """
    from bitnet_jax.data.tokenizers import ByteTokenizer, HFTokenizer

    control, unused, normal = 3, 5, 1  # llama.cpp's token types
    if tokenizer == "bytes":
        # ByteLevel's alphabet in GPT-2's byte order: byte b <-> the b-th printable stand-in.
        alphabet = _gpt2_byte_chars()
        vocab = {alphabet[b]: b for b in range(256)}
        vocab["<|endoftext|>"] = ByteTokenizer.eod_id
        # llama.cpp's gpt2 tokenizer needs a merges array, and gguf drops empty ones: one merge
        # of the end-of-text token with itself, which BPE never sees (specials split first).
        merges = ["<|endoftext|> <|endoftext|>"]
        eod, specials = ByteTokenizer.eod_id, {ByteTokenizer.eod_id}
    else:
        hf = HFTokenizer(tokenizer)
        spec = json.loads(hf._tokenizer.to_str())
        model = spec["model"]
        require(model.get("type") == "BPE" and hf.byte_level,
                f"{tokenizer}: only byte-level BPE tokenizers map onto llama.cpp's 'gpt2' "
                f"tokenizer; pass token ids to llama.cpp instead")
        vocab = dict(model["vocab"])
        specials = set()
        for added in spec.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            if added.get("special"):
                specials.add(added["id"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        eod = hf.eod_id
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = _byte_level_tokens(vocab, size)
    known = set(vocab.values())
    types = [control if i in specials else normal if i in known else unused for i in range(size)]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges,
            "eos": eod, "bos": eod}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _write_tokenizer(writer, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    writer.add_eos_token_id(meta["eos"])
    writer.add_bos_token_id(meta["bos"])
    writer.add_add_bos_token(False)  # our prompts carry no BOS (generate encodes text only)
    writer.add_add_eos_token(False)


def export_gguf(bundle: ModelBundle, out_path: str | Path, qtype: str = "tq2_0",
                head_type: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write `bundle` as a GGUF file llama.cpp loads; returns {path, architecture, bytes, ...}.

    `bundle.params` holds float kernels, or the stored inference weights of
    `packed_params.load_inference_params` (int8 or 2-bit codes and scales).

    `qtype` is the type of the seven decoder linears; `head_type` of the token embedding (and
    the untied head): default float16 for ternary types, else `qtype`.
    """
    import gguf

    config, recipe = bundle.config, bundle.recipe
    arch = gguf_architecture(config, recipe, qtype)
    head_type = head_type or ("f16" if qtype.startswith("tq") else qtype)
    require(head_type in HEAD_TYPES, f"--head-type {head_type!r}; choose one of {HEAD_TYPES}")
    if head_type == "q8_0":
        require(config.d_model % 32 == 0, f"q8_0 packs 32 values a block; d_model={config.d_model}")
    out_path = Path(out_path)
    require(overwrite or not out_path.exists(), f"{out_path} exists; pass --overwrite")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(f"bitnet-jax {recipe.name} {config.n_layers}x{config.d_model}")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else
                             gguf.LlamaFileType.ALL_F32 if qtype == "f32" else
                             gguf.LlamaFileType.MOSTLY_BF16 if qtype == "bf16" else
                             gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]))
    _write_tokenizer(writer, tokenizer_metadata(bundle.tokenizer, config.vocab_size))

    params = bundle.params
    _add_weight(writer, "token_embd.weight", _get(params, ("embed_tokens", "embedding")),
                head_type)
    writer.add_tensor("output_norm.weight", _get(params, ("norm", "scale")))
    if not config.tie_embeddings:
        _add_weight(writer, "output.weight", _get(params, ("lm_head", "kernel")).T.copy(),
                    head_type)
    for i in range(config.n_layers):
        layer = params[f"layers_{i}"]
        for ours, theirs in _BLOCK_NORMS.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", _get(layer, (ours, "scale")))
        if arch == "bitnet":
            for (parent, ours), theirs in _SUB_NORMS.items():
                writer.add_tensor(f"blk.{i}.{theirs}.weight", _get(layer, (parent, ours, "scale")))
        for linear in DECODER_LINEARS:
            _add_linear(writer, params, i, linear, recipe, config, arch, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(out_path), "architecture": arch, "type": qtype, "head_type": head_type,
            "bytes": out_path.stat().st_size}


def _stored_weight(node: dict, n_out: int,
                   separate_scale: bool) -> tuple[np.ndarray, Optional[float]]:
    """As `_linear_weight`, from inference weights (`codes` int8 or `packed` 2-bit, `scale`
    `()` or `(out,)`, see `packed_params.load_inference_params`): no float kernels needed."""
    from bitnet_jax.core import packing

    if "packed" in node:
        codes = packing.unpack_2bit(np.asarray(node["packed"]), n_out, np.int8, validate=False)
    else:
        codes = np.asarray(node["codes"])
    scale = np.asarray(node["scale"], np.float32)
    if separate_scale and scale.ndim == 0:
        return codes.astype(np.float32), float(scale)
    return codes.astype(np.float32) * scale.reshape(-1, 1), None


def _add_linear(writer, params: Any, layer: int, linear: DecoderLinear,
                recipe: PrecisionRecipe, config: ModelConfig, arch: str, qtype: str) -> None:
    node = params[f"layers_{layer}"][linear.parent][linear.name]
    if "kernel" in node:
        weight, scale = _linear_weight(_get(params, kernel_path(layer, linear)),
                                       recipe.role(linear.role).weight,
                                       separate_scale=arch == "bitnet")
    else:
        weight, scale = _stored_weight(node, linear.shape(config)[1], arch == "bitnet")
    if arch == "llama" and linear.name in ("q_proj", "k_proj"):
        weight = _rope_pairs(weight, config.n_heads if linear.name == "q_proj"
                             else config.n_kv_heads)
    name = f"blk.{layer}.{_LINEAR_NAMES[linear.name]}"
    _add_weight(writer, f"{name}.weight", weight, qtype)
    if scale is not None:
        writer.add_tensor(f"{name}.scale", np.array([scale], np.float32))
