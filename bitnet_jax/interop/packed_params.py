"""What a packed checkpoint's codes become: float kernels to train on, or inference weights.

`load_packed` rebuilds float kernels (`codec.exact_latent`) that `quant.ternary_absmean` maps
back to exactly the stored codes and scales: the loaded model computes the saved quantized
forward and can be trained on. `load_ternary_weights` and `load_inference_params` give the int8
(or 2-bit) codes and scales directly, for inference without float kernels. The file format
itself is `interop.packed`.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from bitnet_jax.core import codec
from bitnet_jax.core import quant
from bitnet_jax.errors import require
from bitnet_jax.interop.packed import flat_params, nested_params, open_packed, quantized_kernels
from bitnet_jax.interop.run_dir import ModelBundle

__all__ = ["INFERENCE_WEIGHTS", "PackedLinear", "load_inference_params", "load_packed",
           "load_ternary_weights"]

INFERENCE_WEIGHTS = ("int8", "packed")


def load_packed(directory: str | os.PathLike) -> ModelBundle:
    """Read a packed checkpoint back as a ModelBundle of float32 parameters.

    Each kernel comes from `codec.exact_latent(codes, scale)`: quantizing it again gives
    exactly the stored codes and scale, so the model's quantized forward equals the saved one
    and training can continue from it.
    """
    stored = open_packed(directory)
    kernels = quantized_kernels(stored.shapes, stored.recipe)
    flat = {}
    for path, leaf in flat_params(stored.shapes).items():
        if path in kernels:
            w = kernels[path]
            codes_IxO = stored.codes(path, tuple(leaf.shape)).T
            flat[path] = jnp.asarray(codec.exact_latent(codes_IxO, stored.scale(path),
                                                        w.granularity, w.group_size))
        else:
            flat[path] = jnp.asarray(stored.tensors[path], jnp.float32)
    return ModelBundle(stored.config, stored.manifest["precision"], nested_params(flat),
                       stored.tokenizer)


class PackedLinear(NamedTuple):
    """One ternary linear layer as stored, for an inference engine.

    `codes`: int8 in {-1, 0, 1}, torch layout `(out, in)`; `scale`: float32 in the shape of
    `quant.ternary_absmean` for the `(in, out)` kernel (`()`, `(1, out)` or `(groups, 1, out)`).
    """

    codes: np.ndarray
    scale: np.ndarray
    granularity: str
    group_size: int | None

    def quantized(self) -> quant.Quantized:
        """As `quant.Quantized` on the Flax `(in, out)` kernel (e.g. to dequantize)."""
        return quant.Quantized(jnp.asarray(self.codes.T, jnp.float32), jnp.asarray(self.scale))


def load_ternary_weights(directory: str | os.PathLike) -> dict[str, PackedLinear]:
    """Flax kernel path -> PackedLinear, straight from the packed bytes (no float kernels)."""
    stored = open_packed(directory)
    flat, out = flat_params(stored.shapes), {}
    for path, w in quantized_kernels(stored.shapes, stored.recipe).items():
        codes = stored.codes(path, tuple(flat[path].shape))
        out[path] = PackedLinear(codes, stored.scale(path), w.granularity, w.group_size)
    return out


def load_inference_params(directory: str | os.PathLike,
                          weights: str = "int8") -> tuple[ModelBundle, dict]:
    """The bundle's description and the parameters of `Transformer(config, recipe, weights=...)`.

    Each quantized `.../kernel` becomes the stored-weight parameters of `layers.BitLinear`:
    `codes` int8 `(out, in)` ("int8") or `packed` uint8 `(ceil(out/4), in)` in the 2-bit layout
    ("packed": a 2bit file's bytes are used as they are), plus `scale`, `()` per tensor or
    `(out,)` per channel. Everything else is float32. The returned bundle has `params=None`.
    """
    require(weights in INFERENCE_WEIGHTS,
            f"weights={weights!r}; choose one of {INFERENCE_WEIGHTS}")
    stored = open_packed(directory)
    kernels = quantized_kernels(stored.shapes, stored.recipe)
    require(all(w.granularity != "group" for w in kernels.values()),
            f"precision {stored.recipe.name!r} has per-group scales, which stored (int8/packed) "
            f"weights do not support; use load_packed")
    flat = {}
    for path, leaf in flat_params(stored.shapes).items():
        if path not in kernels:
            flat[path] = jnp.asarray(stored.tensors[path], jnp.float32)
            continue
        module = path.rsplit("/", 1)[0]
        scale = stored.scale(path)
        # BitLinear's stored scale: () per tensor, (out,) per channel (not (1, out)).
        flat[module + "/scale"] = jnp.asarray(scale.reshape(scale.shape[-1:]))
        if weights == "packed" and stored.layout == "2bit":
            flat[module + "/packed"] = jnp.asarray(stored.packed(path))
            continue
        codes = stored.codes(path, tuple(leaf.shape))
        if weights == "packed":
            flat[module + "/packed"] = jnp.asarray(codec.pack_codes(codes, "2bit"))
        else:
            flat[module + "/codes"] = jnp.asarray(codes)
    bundle = ModelBundle(stored.config, stored.manifest["precision"], None, stored.tokenizer)
    return bundle, nested_params(flat)
