"""Precision recipes as data: which quantizer each linear role and the KV cache get.

A recipe never changes the model's code path or parameters, only how the linear layers and the
KV cache are quantized, so that bf16 and ternary runs of one preset differ in precision alone.
Embeddings and the output head always stay full precision.

Names: `bf16`, `b1`, `b1.58`, `a4.8`, `v2-a4`, `v2-a8`, and the generic `w{W}a{A}` family
(W in 1, 1.58, 2..8, 16; A in 2..8, 16; 16 means "not quantized"), e.g. `w1.58a8` (= b1.58),
`w4a8`, `w2a16`. A suffix `@channel` or `@g{N}` switches the weight scales of any recipe to per
output channel or per group of N input features: `b1.58@channel`, `w4a8@g128`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import jax

from bitnet_jax.core import quant

LINEAR_ROLES = ("qkv", "attn_out", "gate_up", "down")


@dataclass(frozen=True)
class WeightQuantizer:
    """How a linear weight is quantized. Hashable, so it can be a static argument under jit."""

    kind: str  # "ternary" | "binary" | "absmax"
    bits: float  # 1.58 for ternary, 1 for binary, k for k-bit absmax
    granularity: str = "tensor"  # "tensor" | "channel" | "group"
    group_size: Optional[int] = None

    def __call__(self, w: jax.Array) -> quant.Quantized:
        if self.kind == "ternary":
            return quant.ternary_absmean(w, self.granularity, self.group_size)
        if self.kind == "binary":
            return quant.binary_sign(w, self.granularity, self.group_size)
        return quant.absmax_weight(w, int(self.bits), self.granularity, self.group_size)


@dataclass(frozen=True)
class ActivationQuantizer:
    """How the input of a linear layer is quantized, per token.

    `keep_ratio` < 1 applies TopK sparsification first (a4.8), inside the straight-through estimator.
    """

    kind: str  # "absmax" | "absmean"
    bits: int
    keep_ratio: float = 1.0

    def __call__(self, x: jax.Array) -> quant.Quantized:
        if self.keep_ratio < 1.0:
            x = quant.topk_per_token(x, self.keep_ratio)
        if self.kind == "absmean":
            return quant.absmean_per_token(x, self.bits)
        return quant.absmax_per_token(x, self.bits)


@dataclass(frozen=True)
class LinearPrecision:
    """The precision of one linear role. `hadamard` rotates the input first (BitNet v2)."""

    weight: Optional[WeightQuantizer] = None
    activation: Optional[ActivationQuantizer] = None
    hadamard: bool = False

    @property
    def weight_bits(self) -> float:
        return self.weight.bits if self.weight else 16

    @property
    def activation_bits(self) -> float:
        return self.activation.bits if self.activation else 16

    @property
    def supports_integer_matmul(self) -> bool:
        return (self.weight is not None and self.activation is not None
                and self.weight.bits <= 8 and self.activation.bits <= 8)


@dataclass(frozen=True)
class KVCachePrecision:
    """Absmax quantization of keys and values after RoPE, per token and head.

    The first position (BOS) may keep more bits (`bos_bits`), as in BitNet a4.8.
    """

    bits: int
    bos_bits: Optional[int] = None


@dataclass(frozen=True)
class PrecisionRecipe:
    name: str
    qkv: LinearPrecision
    attn_out: LinearPrecision
    gate_up: LinearPrecision
    down: LinearPrecision
    kv_cache: Optional[KVCachePrecision] = None
    description: str = ""

    def role(self, role: str) -> LinearPrecision:
        if role not in LINEAR_ROLES:
            raise ValueError(f"unknown linear role {role!r}; roles are {', '.join(LINEAR_ROLES)}")
        return getattr(self, role)

    @property
    def roles(self) -> dict[str, LinearPrecision]:
        return {r: getattr(self, r) for r in LINEAR_ROLES}

    @property
    def quantizes_weights(self) -> bool:
        return any(p.weight is not None for p in self.roles.values())

    @property
    def supports_integer_matmul(self) -> bool:
        return all(p.supports_integer_matmul for p in self.roles.values())


def _uniform(name, weight, activation, description, kv_cache=None, hadamard_roles=()):
    roles = {r: LinearPrecision(weight, activation, r in hadamard_roles) for r in LINEAR_ROLES}
    return PrecisionRecipe(name=name, kv_cache=kv_cache, description=description, **roles)


TERNARY = WeightQuantizer("ternary", 1.58)
BINARY = WeightQuantizer("binary", 1)
A8 = ActivationQuantizer("absmax", 8)
A4_ABSMEAN = ActivationQuantizer("absmean", 4)
# The output head for inference with head="int8" (never trained this way): 8-bit absmax codes with
# one scale per vocabulary row and 8-bit inputs per token, so the logits are int8 x int8 -> int32
# products. llama.cpp's Q8_0 head is the same bits with a scale per 32 values.
HEAD_INT8 = LinearPrecision(WeightQuantizer("absmax", 8, "channel"), A8)


def _a48() -> PrecisionRecipe:
    return PrecisionRecipe(
        name="a4.8",
        qkv=LinearPrecision(TERNARY, A4_ABSMEAN),
        attn_out=LinearPrecision(TERNARY, ActivationQuantizer("absmax", 8, keep_ratio=0.5)),
        gate_up=LinearPrecision(TERNARY, A4_ABSMEAN),
        down=LinearPrecision(TERNARY, A8),
        kv_cache=KVCachePrecision(bits=3, bos_bits=4),
        description="BitNet a4.8: ternary weights; 4-bit absmean inputs to q/k/v and gate/up; "
        "top-50% sparsified 8-bit input to the attention output; 8-bit input to down; 3-bit KV.",
    )


PRESETS: dict[str, PrecisionRecipe] = {
    "bf16": _uniform("bf16", None, None, "16-bit baseline: no quantization."),
    "b1": _uniform("b1", BINARY, A8, "BitNet (2023): binary weights, 8-bit absmax activations."),
    "b1.58": _uniform("b1.58", TERNARY, A8,
                      "BitNet b1.58: ternary absmean weights, 8-bit absmax activations."),
    "a4.8": _a48(),
    "v2-a8": _uniform("v2-a8", TERNARY, A8, "BitNet v2: b1.58 with Hadamard-rotated inputs to "
                      "the attention output and down projections, 8-bit activations.",
                      hadamard_roles=("attn_out", "down")),
    "v2-a4": _uniform("v2-a4", TERNARY, A4_ABSMEAN, "BitNet v2: ternary weights, 4-bit absmean "
                      "activations, Hadamard-rotated inputs to attention output and down.",
                      hadamard_roles=("attn_out", "down")),
}

_GENERIC = re.compile(r"^w(1\.58|\d+)a(\d+)$")
_SUFFIX = re.compile(r"^(?P<base>[^@]+)(?:@(?P<gran>channel|tensor|g(?P<group>\d+)))?$")


def _generic(name: str) -> PrecisionRecipe:
    match = _GENERIC.match(name)
    w_bits, a_bits = match.group(1), int(match.group(2))
    if w_bits == "1.58":
        weight = TERNARY
    elif w_bits == "1":
        weight = BINARY
    elif 2 <= int(w_bits) <= 8:
        weight = WeightQuantizer("absmax", int(w_bits))
    elif int(w_bits) == 16:
        weight = None
    else:
        raise ValueError(f"weight bits in {name!r} must be 1, 1.58, 2..8 or 16")
    if 2 <= a_bits <= 8:
        activation = ActivationQuantizer("absmax", a_bits)
    elif a_bits == 16:
        activation = None
    else:
        raise ValueError(f"activation bits in {name!r} must be 2..8 or 16")
    return _uniform(name, weight, activation,
                    f"Generic: {w_bits}-bit weights, {a_bits}-bit absmax activations per token.")


def _with_weight_granularity(recipe: PrecisionRecipe, granularity: str, group_size, name):
    def regrain(p: LinearPrecision) -> LinearPrecision:
        if p.weight is None:
            return p
        w = dataclasses.replace(p.weight, granularity=granularity, group_size=group_size)
        return dataclasses.replace(p, weight=w)

    return dataclasses.replace(recipe, name=name, **{r: regrain(p) for r, p in recipe.roles.items()})


def recipe_names() -> list[str]:
    return list(PRESETS) + ["w{W}a{A} (W in 1,1.58,2..8,16; A in 2..8,16)", "<name>@channel",
                            "<name>@g<N>"]


def get_recipe(name: str) -> PrecisionRecipe:
    """Look up a recipe by name (see the module docstring for the grammar)."""
    match = _SUFFIX.match(name.strip())
    base = match.group("base") if match else name
    if base in PRESETS:
        recipe = PRESETS[base]
    elif _GENERIC.match(base):
        recipe = _generic(base)
    else:
        raise ValueError(f"unknown precision recipe {name!r}; valid: {', '.join(recipe_names())}")
    granularity = match.group("gran")
    if granularity is None or granularity == "tensor":
        return recipe if granularity is None else dataclasses.replace(recipe, name=name)
    if match.group("group"):
        group = int(match.group("group"))
        if group < 1:
            raise ValueError(f"group size in {name!r} must be positive")
        return _with_weight_granularity(recipe, "group", group, name)
    return _with_weight_granularity(recipe, "channel", None, name)
