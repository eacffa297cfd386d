"""Decoding from 2-bit packed ternary weights without unpacking them to int8.

`layers.BitLinear` with `weights="packed"` unpacks its codes to int8 and multiplies them
(`quant.codes_dot`); under `jit` XLA writes the unpacked int8 weights to memory before every
product, so each decode step moves 8 bits a weight instead of 2. `packed_products()` is a Flax
method interceptor that swaps exactly that product for `cpu_ternary.ternary_dot_or_xla`,
which reads the packed bytes directly: same integers, same scaling, same numbers
(tests/test_cpu_ternary.py, tests/test_inference.py). Layers it does not cover (an inner
RMSNorm, Hadamard rotations, float products) run unchanged.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax.numpy as jnp

from bitnet_jax.core import cpu_ternary
from bitnet_jax.model.layers import BitLinear

__all__ = ["packed_products"]


def _covered(module: nn.Module) -> bool:
    precision = module.precision
    return (module.weights == "packed" and module.integer and precision.weight is not None
            and precision.activation is not None and precision.activation.bits <= 8
            and not module.inner_norm and not precision.hadamard)


def _packed_bitlinear(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, BitLinear) and context.method_name == "__call__"
            and _covered(module)):
        return next_fun(*args, **kwargs)
    (x,) = args
    packed = module.get_variable("params", "packed")
    w_scale = module.get_variable("params", "scale")
    # As quant.codes_dot's integer path: int32 product, then activation and weight scales.
    xq = module.precision.activation(x)
    acc = cpu_ternary.ternary_dot_or_xla(xq.codes.astype(jnp.int8), packed, module.features)
    y = acc.astype(jnp.float32) * xq.scale
    y = (y * w_scale.astype(jnp.float32)).astype(module.dtype)
    return y.astype(module.out_dtype or module.dtype)


def packed_products():
    """Context manager: inside it, packed integer BitLinear layers multiply packed bytes
    directly (when the kernel is available; otherwise nothing changes)."""
    if not cpu_ternary.available():
        return contextlib.nullcontext()
    return nn.intercept_methods(_packed_bitlinear)
