"""The model for Flax NNX users: a native `nnx` BitLinear and RMSNorm, and the Transformer bridged.

`BitLinear` here is the linen one (`model/layers.py`) as an `nnx.Module`: the same pure quantizer
and matmul functions (`core/quant.py`, `core/matmul.py`) driven by the same `LinearPrecision`,
the same parameter names (`kernel`, `norm/scale`) and the same logical axes (each `nnx.Param`
carries them as `out_sharding`, which `nnx.get_partition_spec` maps to mesh axes under
`nn.logical_axis_rules`).
Only float (training) weights: the int8 / packed inference formats stay with the linen module.

The whole decoder comes through Flax's own bridge (`nnx.bridge.ToNNX`) rather than a second
implementation, so there is one Transformer to keep right: `transformer(config, recipe)` is an
`nnx.Module` whose parameter tree is the linen tree (`load_params` puts a trained one in).

Sharding: Flax >= 0.12 shards an annotated variable when it is created ("eager sharding"), which
needs a mesh. Without one in context (`jax.set_mesh`) parameters are created unsharded and keep
their logical names as metadata, as linen's boxed parameters do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from bitnet_jax.core import hadamard, matmul
from bitnet_jax.core.precision import LinearPrecision, PrecisionRecipe, get_recipe
from bitnet_jax.errors import require
from bitnet_jax.model.transformer import ModelConfig, Transformer, validate_recipe_for_model

Dtype = Any


def _eager_sharding() -> bool:
    """Shard parameters at creation only where Flax is set to and a mesh is there to shard on."""
    return nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty


def _param(init, key: jax.Array, shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(key, shape, dtype), out_sharding=axes, eager_sharding=_eager_sharding())


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis in float32 with a learned `scale` (as `layers.RMSNorm`)."""

    def __init__(self, features: int, eps: float = 1e-5, dtype: Dtype = jnp.bfloat16,
                 param_dtype: Dtype = jnp.float32, axis_name: str = "norm"):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(axis_name,),
                               eager_sharding=_eager_sharding())

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class BitLinear(nnx.Module):
    """A bias-free linear layer quantized as `precision` says (see `layers.BitLinear`).

    Input -> optional inner RMSNorm (`norm`) -> optional Hadamard rotation -> activation
    quantizer (STE) -> product with the quantized `kernel` (in, out) -> rescale; `integer=True`
    runs the product as int8 x int8 -> int32.
    """

    def __init__(self, in_features: int, out_features: int,
                 precision: LinearPrecision = LinearPrecision(),
                 kernel_axes: tuple[str, str] = ("embed", "mlp"), inner_norm: bool = False,
                 norm_eps: float = 1e-5, integer: bool = False, dtype: Dtype = jnp.bfloat16,
                 out_dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Any = nn.initializers.normal(stddev=0.02), *, rngs: nnx.Rngs):
        self.precision, self.integer = precision, integer
        self.dtype, self.out_dtype = dtype, out_dtype
        self.kernel = _param(kernel_init, rngs.params(), (in_features, out_features),
                             param_dtype, kernel_axes)
        self.norm = (RMSNorm(in_features, norm_eps, dtype, param_dtype, kernel_axes[0])
                     if inner_norm else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is not None:
            x = self.norm(x)
        if self.precision.hadamard:
            x = hadamard.rotate_activations(x)
        return matmul.quantized_dot(x, self.kernel[...], self.precision.activation,
                                    self.precision.weight, self.dtype, self.integer,
                                    out_dtype=self.out_dtype)


# ----------------------------------------------------------------------------------------------
# The whole Transformer through nnx.bridge.

def _creation_context():
    """Without a mesh, bridged parameters keep their logical axes as metadata only (see above)."""
    return contextlib.nullcontext() if _eager_sharding() else nnx.use_eager_sharding(False)


def transformer(config: ModelConfig, recipe: PrecisionRecipe | str = "bf16",
                rngs: Optional[nnx.Rngs] = None, integer: bool = False,
                params: Any = None) -> nnx.bridge.ToNNX:
    """`Transformer(config, recipe)` as an initialised `nnx.Module` (through `nnx.bridge.ToNNX`).

    Called on tokens (B, T) it returns float32 logits (B, T, vocab), as the linen model does.
    `params`, a linen parameter tree (e.g. `ModelBundle.params`), replaces the random ones.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    validate_recipe_for_model(config, recipe)
    model = nnx.bridge.ToNNX(Transformer(config, recipe, integer),
                             rngs=rngs if rngs is not None else nnx.Rngs(0))
    with _creation_context():
        nnx.bridge.lazy_init(model, jnp.zeros((1, 8), jnp.int32))
    if params is not None:
        load_params(model, params)
    return model


def load_params(model: nnx.Module, params: Any) -> None:
    """Put a linen parameter tree (plain or boxed arrays) into a bridged model's `nnx.Param`s,
    keeping their metadata; the two trees must have the same paths and shapes."""
    new = traverse_util.flatten_dict(nn.unbox(dict(params)))
    state = nnx.state(model, nnx.Param)
    old = dict(nnx.to_flat_state(state))
    require(set(new) == set(old),
            f"the parameters do not fit this model: missing {sorted(set(old) - set(new))[:4]}, "
            f"unexpected {sorted(set(new) - set(old))[:4]}; load parameters of the same "
            f"ModelConfig")
    for path, variable in old.items():
        value = jnp.asarray(new[path], variable[...].dtype)
        require(value.shape == variable[...].shape,
                f"parameter {'/'.join(path)} has shape {value.shape}, the model "
                f"{variable[...].shape}; load parameters of the same ModelConfig")
        variable[...] = value
    nnx.update(model, state)


def linen_params(model: nnx.Module) -> dict:
    """The bridged model's parameters as a plain linen tree (for `Transformer.apply`, orbax,
    `save_run`)."""
    flat = {path: variable[...] for path, variable in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return traverse_util.unflatten_dict(flat)
