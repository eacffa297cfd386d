"""Compute accounting from a ModelConfig and a PrecisionRecipe alone.

Parameter counts, training FLOPs per token under named conventions, the BitNet inference energy
model, weight memory at each storage format, and MFU. Everything here is plain Python arithmetic
on the config's shapes (no JAX computation, no Flax init), so a 4B preset is accounted instantly.

Shapes come from the model's table of decoder linears (`model.linears`): per layer q
(d, n_heads*head_dim), k and v (d, n_kv_heads*head_dim), o (n_heads*head_dim, d), gate and up
(d, d_ff), down (d_ff, d); no biases. Sizes below are given as torch-layout
(out_features, in_features) where a layout matters (2-bit packing pads the output axis).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from bitnet_jax.core.packing import BITS_PER_WEIGHT, packed_nbytes
from bitnet_jax.core.precision import LINEAR_ROLES
from bitnet_jax.model.linears import LinearShape, linear_shapes

if TYPE_CHECKING:  # only for annotations: keep this module free of Flax at import time
    from bitnet_jax.model.transformer import ModelConfig
    from bitnet_jax.core.precision import PrecisionRecipe, WeightQuantizer

__all__ = [
    "LinearShape", "linear_shapes", "ParamCounts", "param_counts",
    "FLOP_CONVENTIONS", "FLOP_CONVENTION_NOTES", "forward_flops_per_token", "flops_per_token",
    "train_flops",
    "ENERGY_NODES", "OP_ENERGY_PJ", "OpEnergy", "Energy", "EnergyBreakdown", "matmul_arithmetic",
    "matmul_energy", "matmul_energy_ratio", "energy_per_token",
    "WeightMemory", "weight_formats", "weight_memory", "mfu", "summarize",
]

BYTES_16BIT = 2
BYTES_SCALE = 4  # quantization scales are float32


# ----------------------------------------------------------------------------------------------
# Shapes and parameter counts.

def _norm_params_per_layer(config: "ModelConfig") -> int:
    d = config.d_model
    if config.norm_placement == "pre":  # input_layernorm + post_attention_layernorm
        return 2 * d
    if config.norm_placement == "subln":  # pre + attn_sub_norm + ffn_sub_norm
        return 2 * d + config.q_dim + config.d_ff
    if config.norm_placement == "bitlinear":  # an RMSNorm of its input size inside every linear
        return sum(s.n_in for s in linear_shapes(config))
    raise ValueError(f"unknown norm placement {config.norm_placement!r}")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts. Equal, exactly, to the number of parameters the Flax model creates.

    `embedding`: token embedding plus the untied output head (the head counts as embedding, as
    in Kaplan et al.). `non_embedding`: everything else, i.e. `linear` + `norm`.
    """

    embedding: int
    linear: int
    norm: int
    linear_by_role: dict[str, int]  # summed over layers

    @property
    def non_embedding(self) -> int:
        return self.linear + self.norm

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding

    def quantized_linear(self, recipe: "PrecisionRecipe") -> int:
        """Linear weights whose role quantizes its weights (0 for bf16)."""
        return sum(n for role, n in self.linear_by_role.items()
                   if recipe.role(role).weight is not None)

    def as_dict(self) -> dict:
        return {"embedding": self.embedding, "non_embedding": self.non_embedding,
                "linear": self.linear, "norm": self.norm, "total": self.total,
                "linear_by_role": dict(self.linear_by_role)}


def param_counts(config: "ModelConfig") -> ParamCounts:
    """Count parameters from the shapes alone (see the module docstring for the layout)."""
    by_role = dict.fromkeys(LINEAR_ROLES, 0)
    for shape in linear_shapes(config):
        by_role[shape.role] += shape.size * config.n_layers
    heads = 1 if config.tie_embeddings else 2  # the tied head reuses the embedding table
    return ParamCounts(
        embedding=heads * config.vocab_size * config.d_model,
        linear=sum(by_role.values()),
        norm=config.n_layers * _norm_params_per_layer(config) + config.d_model,  # + final norm
        linear_by_role=by_role,
    )


# ----------------------------------------------------------------------------------------------
# Training FLOPs.

# Named FLOP conventions (they shift fitted scaling exponents, Porian et al. 2024; record which
# one every figure uses). One FLOP is one multiply or one add, so a multiply-accumulate is 2.
#   kaplan: 6 * N_non_embedding per token (Kaplan et al. 2020); attention and head ignored.
#   full:   Chinchilla/Porian: 3 x forward (backward = 2 x forward), forward = 2 x linear weights
#           + attention logits and values 2 * 2 * seq_len * (n_heads*head_dim) per layer (every
#           query against every key) + output layer 2 * d_model * vocab.
#   causal: as `full` with the attention term halved for the causal mask (MaxText's MFU count).
# Left out of `full` and `causal`: RMSNorms, RoPE, softmax, the gate non-linearity, residual adds
# and the embedding lookup (all O(d) per token, under 1% for real shapes), and quantizer overhead.
FLOP_CONVENTIONS: tuple[str, ...] = ("kaplan", "full", "causal")

FLOP_CONVENTION_NOTES: dict[str, str] = {
    "kaplan": "6 N_non_embedding (attention and head ignored)",
    "full": "3 x (2 N_linear + 4 T d_attn L + 2 d V), all-pairs attention",
    "causal": "3 x (2 N_linear + 2 T d_attn L + 2 d V), causal attention halved",
}


def _check_convention(convention: str) -> None:
    if convention not in FLOP_CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; "
                         f"choose one of {', '.join(FLOP_CONVENTIONS)}")


def _seq_len(config: "ModelConfig", seq_len: Optional[int], what: str = "seq_len") -> int:
    seq_len = config.max_seq_len if seq_len is None else seq_len
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"{what} must be a positive integer, got {seq_len!r}")
    return seq_len


def forward_flops_per_token(config: "ModelConfig", convention: str = "causal",
                            seq_len: Optional[int] = None) -> float:
    """Forward-pass FLOPs per token (a third of the training FLOPs in every convention).

    Precision does not enter: a ternary recipe changes the energy of each operation, not the
    count of operations (training runs the same 16-bit matmuls with fake-quantized operands).
    """
    _check_convention(convention)
    seq_len = _seq_len(config, seq_len)
    counts = param_counts(config)
    if convention == "kaplan":
        return 2.0 * counts.non_embedding
    # QK^T and PV: each query meets seq_len keys, head_dim MACs per head, 2 FLOPs per MAC.
    attention = 2 * 2 * seq_len * config.q_dim * config.n_layers
    if convention == "causal":
        attention /= 2  # on average a query sees half the keys under the causal mask
    head = 2 * config.d_model * config.vocab_size  # logits, even with tied embeddings
    return float(2 * counts.linear + attention + head)


def flops_per_token(config: "ModelConfig", convention: str = "causal",
                    seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token: 3 x forward (backward costs twice the forward).

    `seq_len` (default `config.max_seq_len`) sets the attention span. Independent of precision:
    ternary recipes change energy, not FLOP counts.
    """
    return 3.0 * forward_flops_per_token(config, convention, seq_len)


def train_flops(config: "ModelConfig", tokens: float, convention: str = "causal",
                seq_len: Optional[int] = None) -> float:
    """Training FLOPs for `tokens` tokens, C = tokens x flops_per_token."""
    if tokens < 0:
        raise ValueError(f"tokens must be non-negative, got {tokens!r}")
    return float(tokens) * flops_per_token(config, convention, seq_len)


# ----------------------------------------------------------------------------------------------
# Inference energy: the BitNet (2023) energy model, Table 2 (Horowitz 45nm, scaled to 7nm).

@dataclass(frozen=True)
class OpEnergy:
    """Energy of one scalar operation, in picojoules."""

    add: float
    mul: float


ENERGY_NODES: tuple[str, ...] = ("45nm", "7nm")

OP_ENERGY_PJ: dict[str, dict[str, OpEnergy]] = {
    "45nm": {"fp32": OpEnergy(0.9, 3.7), "fp16": OpEnergy(0.4, 1.1), "int8": OpEnergy(0.03, 0.2)},
    "7nm": {"fp32": OpEnergy(0.38, 1.31), "fp16": OpEnergy(0.16, 0.34),
            "int8": OpEnergy(0.007, 0.07)},
}


def _op_energy(node: str, fmt: str) -> OpEnergy:
    if node not in OP_ENERGY_PJ:
        raise ValueError(f"unknown process node {node!r}; choose one of {', '.join(ENERGY_NODES)}")
    return OP_ENERGY_PJ[node][fmt]


@dataclass(frozen=True)
class Energy:
    """Arithmetic energy split into additions and multiplications, in picojoules."""

    add_pj: float = 0.0
    mul_pj: float = 0.0

    @property
    def total_pj(self) -> float:
        return self.add_pj + self.mul_pj

    def __add__(self, other: "Energy") -> "Energy":
        return Energy(self.add_pj + other.add_pj, self.mul_pj + other.mul_pj)

    def scaled(self, factor: float) -> "Energy":
        return Energy(self.add_pj * factor, self.mul_pj * factor)

    def as_dict(self) -> dict:
        return {"add_pj": self.add_pj, "mul_pj": self.mul_pj, "total_pj": self.total_pj}


def matmul_arithmetic(weight_bits: float, activation_bits: float) -> str:
    """Which arithmetic a matmul runs: "fp16", "int" (k-bit integer) or "ternary" (adds only).

    Operands wider than 8 bits are full precision (the table's only integer width is 8; recipes
    use 16 for "not quantized"). Weights under 2 bits (ternary 1.58, binary 1) with integer
    activations turn multiplies into additions. Integer activations narrower than 8 bits (a4.8's
    4-bit inputs) are costed at INT8, the smallest width in the table, so they save nothing here.
    """
    if weight_bits > 8 or activation_bits > 8:
        return "fp16"
    return "ternary" if weight_bits < 2 else "int"


def matmul_energy(m: int, n: int, p: int, weight_bits: float = 16, activation_bits: float = 16,
                  node: str = "7nm") -> Energy:
    """Energy of an (m x n) @ (n x p) matmul, formulas of BitNet (2023), Section 4.

    - full precision (`matmul_arithmetic` "fp16"): E_add = m(n-1)p e_add, E_mul = m n p e_mul
      at FP16 energies;
    - k >= 2 bit integer weights, integer activations: the same counts at INT8 energies;
    - ternary/binary weights, integer activations: E_add = m(n-1)p e_add(INT8), and only the
      rescaling multiplies remain, E_mul = (m p + m n) e_mul(INT8) (outputs and inputs).
    """
    for name, value in (("m", m), ("n", n), ("p", p)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"matmul dimension {name} must be a positive integer, got {value!r}")
    arithmetic = matmul_arithmetic(weight_bits, activation_bits)
    op = _op_energy(node, "fp16" if arithmetic == "fp16" else "int8")
    adds = m * (n - 1) * p  # n products summed with n-1 additions, for each of the m*p outputs
    muls = m * n * p if arithmetic != "ternary" else m * p + m * n
    return Energy(add_pj=adds * op.add, mul_pj=muls * op.mul)


def matmul_energy_ratio(node: str = "7nm") -> float:
    """Per-MAC energy of FP16 (add + mul) over an INT8 add: b1.58's 71.4x at 7nm."""
    fp16, int8 = _op_energy(node, "fp16"), _op_energy(node, "int8")
    return (fp16.add + fp16.mul) / int8.add


@dataclass(frozen=True)
class EnergyBreakdown:
    """Arithmetic energy to produce one token at inference (m = 1), by part, in picojoules.

    `linear` holds each precision role summed over layers (qkv = q, k and v; gate_up = gate and
    up). `head`: the output layer at FP16. `attention`: QK^T and PV at FP16 for one query against
    `context_len` keys, i.e. the last token of a full context (the average token of a sequence
    sees about half). Norms, softmax and quantizers are left out, as in the paper.
    """

    node: str
    context_len: int
    linear: dict[str, Energy]
    head: Energy
    attention: Energy

    @property
    def linear_total(self) -> Energy:
        return sum(self.linear.values(), Energy())

    @property
    def total(self) -> Energy:
        return self.linear_total + self.head + self.attention

    @property
    def total_pj(self) -> float:
        return self.total.total_pj

    @property
    def total_j(self) -> float:
        return self.total_pj * 1e-12

    def as_dict(self) -> dict:
        return {"node": self.node, "context_len": self.context_len,
                "linear": {role: e.as_dict() for role, e in self.linear.items()},
                "linear_total": self.linear_total.as_dict(), "head": self.head.as_dict(),
                "attention": self.attention.as_dict(), "total": self.total.as_dict(),
                "total_pj": self.total_pj, "total_j": self.total_j}


def energy_per_token(config: "ModelConfig", recipe: "PrecisionRecipe", node: str = "7nm",
                     context_len: Optional[int] = None) -> EnergyBreakdown:
    """Inference energy per token under the BitNet energy model (see `matmul_energy`).

    Each linear uses its role's weight/activation bits; the head (never quantized) and attention
    products run at FP16 (a quantized KV cache is dequantized for the products, so it does not
    change this estimate). `context_len` defaults to `config.max_seq_len`.
    """
    _op_energy(node, "fp16")  # validate the node before any work
    context_len = _seq_len(config, context_len, "context_len")
    linear = dict.fromkeys(LINEAR_ROLES, Energy())
    for shape in linear_shapes(config):
        precision = recipe.role(shape.role)
        e = matmul_energy(1, shape.n_in, shape.n_out, precision.weight_bits,
                          precision.activation_bits, node)
        linear[shape.role] = linear[shape.role] + e.scaled(config.n_layers)
    head = matmul_energy(1, config.d_model, config.vocab_size, 16, 16, node)
    # Per head: scores q (1 x head_dim) @ K^T (head_dim x ctx), values p (1 x ctx) @ V (ctx x hd);
    # together 2 * context_len * head_dim MACs per head.
    per_head = (matmul_energy(1, config.head_dim, context_len, 16, 16, node)
                + matmul_energy(1, context_len, config.head_dim, 16, 16, node))
    attention = per_head.scaled(config.n_heads * config.n_layers)
    return EnergyBreakdown(node, context_len, linear, head, attention)


# ----------------------------------------------------------------------------------------------
# Weight memory at inference.

def weight_formats(weight: Optional["WeightQuantizer"]) -> dict[str, float]:
    """Storage formats of a linear weight and their bits per weight; the first is the default.

    Unquantized: 16-bit. Ternary: `2bit` (Hugging Face packing, the default), `base3` (5 weights
    per byte, 1.6 bits) and the information `limit` log2(3). Binary: 1 bit. k-bit absmax: k bits.
    """
    if weight is None:
        return {"16bit": 16.0}
    if weight.kind == "ternary":
        return dict(BITS_PER_WEIGHT)
    if weight.kind == "binary":
        return {"1bit": 1.0}
    return {f"{int(weight.bits)}bit": float(weight.bits)}


def _weight_nbytes(shape: LinearShape, fmt: str, bits: float) -> int:
    if fmt in ("2bit", "base3"):  # real layouts: padding depends on the (out, in) shape
        return packed_nbytes(shape.torch_shape, fmt)
    return math.ceil(shape.size * bits / 8)  # a dense bit stream per tensor


def _scale_count(shape: LinearShape, weight: Optional["WeightQuantizer"]) -> int:
    if weight is None:
        return 0
    if weight.granularity == "channel":  # one per output feature
        return shape.n_out
    if weight.granularity == "group":  # one per group of input features and output feature
        return -(-shape.n_in // weight.group_size) * shape.n_out
    return 1  # per tensor (binary keeps only beta at inference: alpha just centres before Sign)


@dataclass(frozen=True)
class WeightMemory:
    """Bytes to store the weights for inference.

    `linear_bytes[fmt]`: all linear weights, with the quantized roles stored in `fmt` (roles the
    recipe leaves unquantized stay 16-bit). Embeddings, the head and norm scales are 16-bit;
    quantization scales are float32 (`scale_bytes`). Totals use `default_format`. `bf16_bytes`
    is the whole model at 16 bits, the reference of `vs_bf16`.
    """

    linear_bytes: dict[str, int]
    default_format: str
    linear_bf16_bytes: int
    embedding_bytes: int
    norm_bytes: int
    scale_bytes: int

    @property
    def bf16_bytes(self) -> int:
        return self.linear_bf16_bytes + self.embedding_bytes + self.norm_bytes

    @property
    def non_embedding_bytes(self) -> int:
        return self.linear_bytes[self.default_format] + self.norm_bytes + self.scale_bytes

    @property
    def total_bytes(self) -> int:
        return self.non_embedding_bytes + self.embedding_bytes

    @property
    def vs_bf16(self) -> float:
        return self.total_bytes / self.bf16_bytes

    def as_dict(self) -> dict:
        return {"linear_bytes": dict(self.linear_bytes), "default_format": self.default_format,
                "linear_bf16_bytes": self.linear_bf16_bytes,
                "embedding_bytes": self.embedding_bytes, "norm_bytes": self.norm_bytes,
                "scale_bytes": self.scale_bytes, "non_embedding_bytes": self.non_embedding_bytes,
                "total_bytes": self.total_bytes, "bf16_bytes": self.bf16_bytes,
                "vs_bf16": self.vs_bf16}


def weight_memory(config: "ModelConfig", recipe: "PrecisionRecipe") -> WeightMemory:
    """Inference weight memory of `config` under `recipe` (see `WeightMemory`)."""
    # Formats offered: those of the first quantized role; a role whose quantizer lacks one of
    # them (only possible in a mixed recipe) is stored in its own default format.
    quantized = [recipe.role(r).weight for r in LINEAR_ROLES if recipe.role(r).weight is not None]
    offered = weight_formats(quantized[0] if quantized else None)
    linear = dict.fromkeys(offered, 0)
    scales = 0
    for shape in linear_shapes(config):
        weight = recipe.role(shape.role).weight
        own = weight_formats(weight)
        default = next(iter(own))
        for fmt in offered:
            use = fmt if fmt in own else default
            linear[fmt] += config.n_layers * _weight_nbytes(shape, use, own[use])
        scales += config.n_layers * _scale_count(shape, weight)
    counts = param_counts(config)
    return WeightMemory(
        linear_bytes=linear,
        default_format=next(iter(offered)),
        linear_bf16_bytes=BYTES_16BIT * counts.linear,
        embedding_bytes=BYTES_16BIT * counts.embedding,
        norm_bytes=BYTES_16BIT * counts.norm,
        scale_bytes=BYTES_SCALE * scales,
    )


# ----------------------------------------------------------------------------------------------
# MFU and the summary.

def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s x FLOPs/token) over the peak FLOP/s.

    Use the same convention for `flops_per_token` as the figure it is compared with (MaxText
    reports MFU with the `causal` convention).
    """
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be positive (FLOP/s of the hardware), got {peak_flops!r}")
    if tokens_per_second < 0 or flops_per_token < 0:
        raise ValueError(f"tokens_per_second and flops_per_token must be non-negative, got "
                         f"{tokens_per_second!r} and {flops_per_token!r}")
    return tokens_per_second * flops_per_token / peak_flops


def summarize(config: "ModelConfig", recipe: "PrecisionRecipe",
              seq_len: Optional[int] = None) -> dict:
    """Everything above as a JSON-able dict. `seq_len` sets both the attention span of the FLOP
    counts and the context of the energy estimate (default `config.max_seq_len`)."""
    seq_len = _seq_len(config, seq_len)
    counts = param_counts(config)
    params = counts.as_dict()
    params["quantized_linear"] = counts.quantized_linear(recipe)
    return {
        "config": dataclasses.asdict(config),
        "precision": {
            "name": recipe.name,
            "description": recipe.description,
            "roles": {role: {"weight_bits": p.weight_bits, "activation_bits": p.activation_bits,
                             "arithmetic": matmul_arithmetic(p.weight_bits, p.activation_bits),
                             "weight_granularity": p.weight.granularity if p.weight else None,
                             "weight_group_size": p.weight.group_size if p.weight else None}
                      for role, p in recipe.roles.items()},
            "kv_cache_bits": recipe.kv_cache.bits if recipe.kv_cache else None,
        },
        "seq_len": seq_len,
        "params": params,
        "flops_per_token": {c: flops_per_token(config, c, seq_len) for c in FLOP_CONVENTIONS},
        "flop_conventions": dict(FLOP_CONVENTION_NOTES),
        "energy_per_token": {node: energy_per_token(config, recipe, node, seq_len).as_dict()
                             for node in ENERGY_NODES},
        "matmul_energy_ratio": {node: matmul_energy_ratio(node) for node in ENERGY_NODES},
        "memory": weight_memory(config, recipe).as_dict(),
    }
