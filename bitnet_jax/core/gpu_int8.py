"""The integer path's forward product on NVIDIA GPUs with its scales applied inside: a Pallas
(Triton) kernel.

    int8_scaled_dot(codes, row_scale, w_codes, w_scale) -> bf16((codes @ w_codes.T)
                                                                * row_scale * w_scale)

codes int8 (..., K) quantized beforehand with one float32 scale per row (shape codes.shape[:-1]),
w_codes int8 (N, K) ("out x in"), w_scale float32 (N,): `cpu_int8_fused.int8_scaled_dot`'s
contract, on the GPU's tensor cores.

Why: on a GPU XLA gives the integer path's int8 product to cuBLAS, which writes its int32 sums,
and a fusion then reads them back, multiplies them by the row and weight scales and writes bf16
(XLA cannot fold a per-row scale into cuBLAS's output). On an H200 at b1.58-700m those passes
were the largest part of what b1.58 adds to the bf16 step (README, Benchmarks: +7.4 ms of 182.5
in elementwise conversions, each forward product writing twice the bytes of its bf16 output).
Here each block of the output accumulates in int32 on the tensor cores and is written once, as
bf16((float32(acc) * row_scale) * w_scale): the float32 multiplies of XLA's path in its order and
one rounding, so the same numbers bit for bit (tested against XLA's path, run by Pallas's
interpreter on the CPU; the Triton lowering is checked there too, the compile and the speed only
on a GPU).

Off by default: it has not been timed on a GPU yet (no device has been lent since it was
written). BITNET_JAX_GPU_INT8_EPILOGUE=1 turns it on (`matmul._scaled_int8_product`),
BITNET_JAX_GPU_INT8_BLOCKS="block_m,block_n,block_k,warps,stages" picks another tiling;
`scripts/bench_gpu_int8.py` times it alone against XLA's product, and `scripts/bench_train.py
--modes bf16,b1.58,b1.58-gpu-epilogue` a training step with it against one without.
Every block is whole (`whole_blocks`: the tiling's blocks halved until they divide M, N and K;
XLA's product where they cannot), since the kernel's loads and stores are not masked. Under
GSPMD the call is partitioned as the CPU kernel's (`cpu_int8_fused.scaled_dot_partitioned`);
under `vmap` it runs one batch element at a time. With it on, a program lowered for the CPU and
a GPU at once (`lowering_platforms=("cpu", "cuda")`) fails: Pallas lowers the GPU branch's
kernel for the CPU too, where only its interpreter runs.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from bitnet_jax.core.cpu_int8_fused import one_batch_element_at_a_time, scaled_dot_partitioned
from bitnet_jax.errors import ConfigError

ENABLE_ENV = "BITNET_JAX_GPU_INT8_EPILOGUE"
BLOCKS_ENV = "BITNET_JAX_GPU_INT8_BLOCKS"
# The custom call this kernel becomes in a program lowered for CUDA (Pallas's Triton lowering in
# jax 0.10.2; later jax names it `pallas.triton.CUSTOM_CALL_TARGET_NAME`).
TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"
_F32 = jnp.float32


class Tiling(NamedTuple):
    """The largest output block one program computes and the largest step along K (each taken
    down by halves until it divides its dimension: `whole_blocks`), and Triton's launch."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    warps: int = 8
    stages: int = 3


# The smallest blocks `whole_blocks` takes: Triton's dot wants 16 rows and columns at least, and
# the tensor cores' int8 steps are 32 deep.
SMALLEST_BLOCK = Tiling(16, 16, 32, 1, 1)


def enabled() -> bool:
    """Whether the integer path's GPU product takes this kernel (BITNET_JAX_GPU_INT8_EPILOGUE=1)."""
    return os.environ.get(ENABLE_ENV, "0").strip() == "1"


def parse_tiling(text: str) -> Tiling:
    """"block_m,block_n,block_k,warps,stages" as a Tiling: powers of two, at least
    `SMALLEST_BLOCK` (a ValueError says what is wrong)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if (len(values) != len(Tiling._fields)
            or any(v < low for v, low in zip(values, SMALLEST_BLOCK))
            or any(v & (v - 1) for v in values[:3])):
        raise ValueError(f"{text!r}: want block_m,block_n,block_k,warps,stages, the blocks "
                         f"powers of two of at least {SMALLEST_BLOCK[:3]}, warps and stages >= 1")
    return Tiling(*values)


def tiling() -> Tiling:
    """The tiling BITNET_JAX_GPU_INT8_BLOCKS asks for, else the default."""
    text = os.environ.get(BLOCKS_ENV, "").strip()
    try:
        return parse_tiling(text) if text else Tiling()
    except ValueError as error:
        raise ConfigError(f"{BLOCKS_ENV}={error}") from None


def _largest_dividing(size: int, largest: int, smallest: int) -> Optional[int]:
    block = largest
    while block >= smallest:
        if size % block == 0:
            return block
        block //= 2
    return None


def whole_blocks(m: int, n: int, k: int, tile: Tiling) -> Optional[tuple[int, int, int]]:
    """(block_m, block_n, step along K): each the tiling's, halved until it divides its
    dimension, or None where one cannot be (then XLA's product). Whole blocks only: the kernel's
    loads and stores are not masked, and on a GPU a block past the edge would read and write
    past the arrays (Pallas's interpreter would not show it)."""
    blocks = tuple(_largest_dividing(size, largest, smallest) for size, largest, smallest
                   in zip((m, n, k), tile[:3], SMALLEST_BLOCK[:3]))
    return None if None in blocks else blocks


def applies(m: int, n: int, k: int) -> bool:
    """Whether an (m, k) x (k, n) product takes this kernel: turned on, and every dimension in
    whole blocks (`whole_blocks`)."""
    return enabled() and whole_blocks(m, n, k, tiling()) is not None


def _product_kernel(codes_ref, row_scale_ref, w_ref, w_scale_ref, y_ref, *, step: int):
    """One (block_m, block_n) block of y: int32 sums over K in steps, then both scales and one
    rounding, as XLA's integer path computes them (`matmul._forward`)."""
    def accumulate(i, acc):
        x = codes_ref[:, pl.ds(i * step, step)]  # (block_m, step) int8
        w = w_ref[:, pl.ds(i * step, step)]  # (block_n, step) int8: K-major, as int8 MMA wants
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.int32)

    k = codes_ref.shape[1]
    acc = jax.lax.fori_loop(0, k // step, accumulate, jnp.zeros(y_ref.shape, jnp.int32))
    y = (acc.astype(_F32) * row_scale_ref[...][:, None]) * w_scale_ref[...][None, :]
    y_ref[...] = y.astype(y_ref.dtype)


def xla_product(codes2, row_scale, w_codes, w_scale):
    """The same product as XLA's integer path takes it (`matmul._forward`): int32 sums, the row
    scale, the weight scale, one rounding. For a device's rows that do not split into whole
    blocks."""
    acc = jax.lax.dot_general(codes2, w_codes, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return ((acc.astype(_F32) * row_scale[:, None]) * w_scale).astype(jnp.bfloat16)


def _local_product(codes2, row_scale, w_codes, w_scale, *, tile: Tiling, interpret: bool):
    """The kernel on one device's rows: codes2 (m, k), row_scale (m,), w_codes (n, k)."""
    m, k = codes2.shape
    n = w_codes.shape[0]
    blocks = whole_blocks(m, n, k, tile)
    if blocks is None:
        return xla_product(codes2, row_scale, w_codes, w_scale)
    block_m, block_n, step = blocks
    return pl.pallas_call(
        functools.partial(_product_kernel, step=step),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(m // block_m, n // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((block_m,), lambda i, j: (i,)),
                  pl.BlockSpec((block_n, k), lambda i, j: (j, 0)),
                  pl.BlockSpec((block_n,), lambda i, j: (j,))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=pallas_triton.CompilerParams(num_warps=tile.warps,
                                                     num_stages=tile.stages),
        interpret=interpret,
    )(codes2, row_scale, w_codes, w_scale)


@functools.cache
def _partitioned(tile: Tiling, interpret: bool):
    def local(codes2, row_scale, w_codes, w_scale):  # positional: what custom_partitioning takes
        return _local_product(codes2, row_scale, w_codes, w_scale, tile=tile, interpret=interpret)

    return scaled_dot_partitioned(local)


def int8_scaled_dot(codes: jax.Array, row_scale: jax.Array, w_codes: jax.Array,
                    w_scale: jax.Array, *, tile: Optional[Tiling] = None,
                    interpret: bool = False) -> jax.Array:
    """bf16((codes @ w_codes.T) * row_scale * w_scale) on the GPU's tensor cores: the integer
    path's y, bit for bit (XLA's product where a device's rows do not split into whole blocks).
    `tile`: the tiling (default `tiling()`); `interpret=True` runs the kernel in Pallas's
    interpreter (any backend: the tests on CPUs)."""
    if codes.dtype != jnp.int8 or w_codes.dtype != jnp.int8:
        raise TypeError(f"gpu_int8.int8_scaled_dot wants int8 codes and weights, got "
                        f"{codes.dtype} and {w_codes.dtype}")
    if w_codes.ndim != 2 or w_codes.shape[1] != codes.shape[-1]:
        raise ValueError(f"w_codes must be int8 (N, K={codes.shape[-1]}), got {w_codes.shape}")
    if w_scale.shape != (w_codes.shape[0],):
        raise ValueError(f"w_scale must have shape ({w_codes.shape[0]},), got {w_scale.shape}")
    lead, n = codes.shape[:-1], w_codes.shape[0]
    rows = math.prod(lead)
    y = one_batch_element_at_a_time(
        _partitioned(tile or tiling(), interpret), codes.reshape(rows, codes.shape[-1]),
        row_scale.reshape(rows).astype(_F32), w_codes, w_scale.astype(_F32))
    return y.reshape(*lead, n)

