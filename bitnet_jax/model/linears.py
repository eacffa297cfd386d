"""The decoder's linear layers: one table that the model, accounting, interop and inference read.

Every decoder layer has the same seven bias-free linears. Each row says where the module sits in
the Flax tree (`layers_{i}/{parent}/{name}/kernel`), which precision role quantizes it (the role
names live in `core.precision.LINEAR_ROLES`) and which `ModelConfig` sizes give its kernel's
`(in, out)` shape. Plain Python (no Flax), so accounting can size a 4B preset without JAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # annotations only: ModelConfig's module imports Flax
    from bitnet_jax.model.transformer import ModelConfig

__all__ = ["DecoderLinear", "DECODER_LINEARS", "PROJECTION_ROLES", "LinearShape", "linear_shapes",
           "decoder_linear", "kernel_path", "LAYER_PREFIX"]

LAYER_PREFIX = "layers_"  # the Flax name of decoder layer i is f"layers_{i}"


@dataclass(frozen=True)
class DecoderLinear:
    """One linear module of a decoder layer.

    `n_in` / `n_out` name the ModelConfig attributes that size its `(in, out)` kernel.
    """

    name: str  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    parent: str  # self_attn or mlp
    role: str  # qkv, attn_out, gate_up, down
    n_in: str
    n_out: str

    def shape(self, config: "ModelConfig") -> tuple[int, int]:
        """The kernel's Flax `(in, out)` shape."""
        return getattr(config, self.n_in), getattr(config, self.n_out)


DECODER_LINEARS: tuple[DecoderLinear, ...] = (
    DecoderLinear("q_proj", "self_attn", "qkv", "d_model", "q_dim"),
    DecoderLinear("k_proj", "self_attn", "qkv", "d_model", "kv_dim"),
    DecoderLinear("v_proj", "self_attn", "qkv", "d_model", "kv_dim"),
    DecoderLinear("o_proj", "self_attn", "attn_out", "q_dim", "d_model"),
    DecoderLinear("gate_proj", "mlp", "gate_up", "d_model", "d_ff"),
    DecoderLinear("up_proj", "mlp", "gate_up", "d_model", "d_ff"),
    DecoderLinear("down_proj", "mlp", "down", "d_ff", "d_model"),
)

# The module name of each linear projection in a decoder layer -> its precision role.
PROJECTION_ROLES: dict[str, str] = {linear.name: linear.role for linear in DECODER_LINEARS}
_BY_PLACE = {(linear.parent, linear.name): linear for linear in DECODER_LINEARS}


def kernel_path(layer: int, linear: DecoderLinear) -> tuple[str, ...]:
    """Where `linear`'s kernel sits in layer `layer` of the parameter tree."""
    return (f"{LAYER_PREFIX}{layer}", linear.parent, linear.name, "kernel")


def decoder_linear(path: Sequence[str]) -> Optional[DecoderLinear]:
    """The table row of a parameter path `(layers_i, parent, name, kernel)`, else None (the
    lm_head is a kernel too, but not a decoder linear)."""
    if len(path) != 4 or not path[0].startswith(LAYER_PREFIX) or path[3] != "kernel":
        return None
    return _BY_PLACE.get((path[1], path[2]))


@dataclass(frozen=True)
class LinearShape:
    """One linear weight of a decoder layer: its module name, precision role and sizes."""

    name: str
    role: str
    n_in: int
    n_out: int

    @property
    def size(self) -> int:
        return self.n_in * self.n_out

    @property
    def torch_shape(self) -> tuple[int, int]:
        """(out_features, in_features), the layout of Hugging Face checkpoints."""
        return (self.n_out, self.n_in)


def linear_shapes(config: "ModelConfig") -> tuple[LinearShape, ...]:
    """The seven linear weights of one decoder layer (every layer has the same)."""
    return tuple(LinearShape(linear.name, linear.role, *linear.shape(config))
                 for linear in DECODER_LINEARS)
