"""Decoding with products that read each weight once, in the form it is stored.

`layers.BitLinear` computes with XLA's dots. At decode shapes (a few rows) two of them move
far more memory than the weights hold: with `weights="packed"` XLA writes the unpacked int8
codes to memory before every product (8 bits a weight instead of 2), and a bf16 dot converts
its bf16 weights to float32 in memory first. `decode_products()` is a Flax method interceptor
that swaps exactly those products for `core.cpu_decode`'s kernels, which read the packed bytes
or the bf16 weights in place:

* packed integer layers: `ternary_dot_or_xla`, the same integers as the int8 product and the
  same scaling as `matmul.codes_dot`, so the same numbers (tests/test_cpu_decode.py);
* unquantized layers (bf16 recipe, untied bf16 head): `bf16_dot_or_xla`, XLA's numbers up to
  the order of float32 sums.

Layers it does not cover (an inner RMSNorm, Hadamard rotations, other dtypes) run unchanged,
and nothing changes where the kernels are unavailable (non-x86, BITNET_JAX_CPU_INT8=0).
The tied head (an einsum inside `Transformer`) is not a BitLinear and stays XLA's; with
`head="int8"` it is an int8 product through `matmul.codes_dot` (`layers.Int8Embedding`).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax.numpy as jnp

from bitnet_jax.core import cpu_decode
from bitnet_jax.model.layers import BitLinear

__all__ = ["decode_products"]


def _plain(module: BitLinear) -> bool:
    return not module.inner_norm and not module.precision.hadamard


def _packed(module: BitLinear, x) -> bool:
    activation = module.precision.activation
    return (module.weights == "packed" and module.integer and module.precision.weight is not None
            and activation is not None and activation.bits <= 8)


def _bf16(module: BitLinear, x) -> bool:
    return (module.precision.weight is None and module.precision.activation is None
            and x.dtype == jnp.bfloat16 and jnp.dtype(module.dtype) == jnp.bfloat16
            and module.get_variable("params", "kernel").dtype == jnp.bfloat16)


def _intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, BitLinear) and context.method_name == "__call__"
            and _plain(module)):
        return next_fun(*args, **kwargs)
    (x,) = args
    if _packed(module, x):
        packed = module.get_variable("params", "packed")
        w_scale = module.get_variable("params", "scale")
        # As matmul.codes_dot's integer path: int32 product, then activation and weight scales.
        xq = module.precision.activation(x)
        acc = cpu_decode.ternary_dot_or_xla(xq.codes.astype(jnp.int8), packed, module.features)
        y = (acc.astype(jnp.float32) * xq.scale) * w_scale.astype(jnp.float32)
    elif _bf16(module, x):
        # As matmul.quantized_dot with no quantizers: float32 sums, then the output dtype.
        y = cpu_decode.bf16_dot_or_xla(x, module.get_variable("params", "kernel"))
    else:
        return next_fun(*args, **kwargs)
    return y.astype(module.out_dtype or module.dtype)  # one rounding, as quant's products


def decode_products():
    """Context manager: inside it, BitLinear layers that a decode kernel covers use it."""
    if not cpu_decode.available():
        return contextlib.nullcontext()
    return nn.intercept_methods(_intercept)
