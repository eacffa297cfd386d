"""The quantized matmul of the BitNet family: a fake-quantized float path and an integer path
under one custom VJP (straight-through gradients), and the product on stored weight codes for
inference.

`quantized_dot` multiplies the codes of `quant`'s quantizers and rescales afterwards, so both
paths give the same numbers wherever the float path's sums are exact; on CPUs it routes pieces
to our kernels (`cpu_int8`, `cpu_int8_fused`, and on AMX tiles or AVX512-BF16 vectors the
backward's products, `cpu_weight_gradient` and `cpu_input_gradient`, with XLA's numbers bit for
bit) and to XLA's int8 dot where those are faster (README, Benchmarks).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from bitnet_jax.core import (cpu_input_gradient, cpu_int8, cpu_int8_fused, cpu_ternary,
                             cpu_weight_gradient, gpu_int8)
from bitnet_jax.core.quant import (EPS, F32, Quantized, Quantizer, absmax_row_parameters,
                                   absmean_row_parameters, code_range, round_clip,
                                   topk_per_token)


# ----------------------------------------------------------------------------------------------
# Quantized matmul: fake-quantized float path or integer path, one custom VJP (STE) for both.


class _Unquantized(NamedTuple):
    codes: jax.Array
    scale: jax.Array
    is_grouped: bool = False

    def dequantize(self, dtype=F32) -> jax.Array:
        return self.codes.astype(dtype)


def _quantize_or_pass(quantizer: Optional[Quantizer], x: jax.Array):
    if quantizer is None:
        return _Unquantized(x, jnp.ones((), F32))
    return quantizer(x)


def _quantize_weight(quantize_w: Optional[Quantizer], w: jax.Array, kernels: bool):
    """`quantize_w(w)`, in one pass of our kernel where the step is lowered for the CPU with our
    kernels and the kernel computes that quantizer (`cpu_ternary`: per-tensor ternary weights; XLA's
    two operations per layer cost the b1.58 step up to 6% there, docs/cpu_training_step_history.md).
    Both paths take it there, so that they keep the same gamma."""
    if kernels and cpu_ternary.applies(quantize_w, w):
        return cpu_ternary.ternary_absmean(w)
    return _quantize_or_pass(quantize_w, w)


def quantize_weight(quantize_w: Quantizer, w: jax.Array) -> Quantized:
    """`quantize_w(w)` as `quantized_dot`'s forward pass computes it on the default backend (on
    CPUs our kernel where it applies: `_quantize_weight`): the codes and scale that stored
    weights and exports hold, so that they give the training forward's numbers."""
    return _quantize_weight(quantize_w, w, kernels=jax.default_backend() == "cpu")


def _code_storage_dtype(quantizer: Optional[Quantizer], fallback):
    """int8 for codes of at most 8 bits (exact, and 4x smaller residuals), else the compute dtype."""
    return jnp.int8 if getattr(quantizer, "bits", 16) <= 8 else fallback


def _dot_codes(x_codes, w_codes, w_grouped_scale, accumulate):
    """x_codes (..., in) . w_codes (in, out) with `accumulate` dtype, per-group scales applied."""
    if w_grouped_scale is None:
        if accumulate == jnp.int32:  # our VNNI kernel on CPU, XLA's int8 dot elsewhere
            return cpu_int8.int8_dot_or_xla(x_codes, w_codes.T)
        return jax.lax.dot_general(
            x_codes, w_codes, (((x_codes.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=accumulate,
        )
    groups = w_grouped_scale.shape[0]
    if accumulate == F32:  # XLA:CPU has no batched bf16 x bf16 -> f32 dot; f32 codes are exact too
        x_codes, w_codes = x_codes.astype(F32), w_codes.astype(F32)
    x_g = x_codes.reshape(*x_codes.shape[:-1], groups, -1)
    w_g = w_codes.reshape(groups, -1, w_codes.shape[-1])
    acc = jnp.einsum("...gk,gko->...go", x_g, w_g, preferred_element_type=accumulate)
    return jnp.sum(acc.astype(F32) * w_grouped_scale[:, 0, :], axis=-2)


def _kernel_quantizes_activation(quantize_x, x, dtype, int8_codes, kernels) -> bool:
    """Whether `_quantize_activation` takes our one-pass kernel: per-token absmax activations
    whose int8 codes XLA's product takes on the CPU (AMX)."""
    return (int8_codes and kernels and getattr(quantize_x, "kind", None) == "absmax"
            and _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype))


def _quantize_activation(quantize_x, x, dtype, int8_codes, kernels):
    """(`quantize_x(x)`, x's `_RowQuantizedX` or None): per-token absmax activations quantized
    in one pass of our kernel where XLA takes the int8 product on the CPU (AMX), with the row
    parameters the backward's X_q^T needs; XLA's row maximum and codes fusion would be two
    operations of the step, which cost it there as the weights' two did (`_quantize_weight`).
    Same numbers either way."""
    if _kernel_quantizes_activation(quantize_x, x, dtype, int8_codes, kernels):
        x = topk_per_token(x, quantize_x.keep_ratio)
        codes, mult, scale = cpu_int8_fused.absmax_quantize(x, quantize_x.bits, floor=EPS)
        rows = _RowQuantizedX(x, mult[..., None], scale[..., None])
        return Quantized(codes, rows.scale), rows
    return _quantize_or_pass(quantize_x, x), None


def _forward(x, w, quantize_x, quantize_w, dtype, integer, kernels, out_dtype, gpu=False):
    """y in `out_dtype`, the quantized x and w, and x's `_RowQuantizedX` where the kernel
    quantized it (else None)."""
    xq, x_rows = _quantize_activation(quantize_x, x, dtype, integer, kernels)
    wq = _quantize_weight(quantize_w, w, kernels)
    code_dtype = jnp.int8 if integer else dtype
    accumulate = jnp.int32 if integer else F32
    grouped_scale = wq.scale if wq.is_grouped else None
    scaled_product = (_scaled_int8_product(kernels, gpu, math.prod(x.shape[:-1]), w.shape[-1],
                                           x.shape[-1]) if integer else None)
    if (scaled_product and grouped_scale is None and out_dtype == jnp.bfloat16
            and xq.scale.size in (1, math.prod(x.shape[:-1]))):
        x_scale = jnp.broadcast_to(jnp.reshape(xq.scale, x.shape[:-1] if xq.scale.size > 1
                                               else ()), x.shape[:-1])
        y = scaled_product(xq.codes.astype(jnp.int8), x_scale, wq.codes.astype(jnp.int8).T,
                           _per_output_scale(wq, w.shape[-1]))
        return y, xq, wq, x_rows
    acc = _dot_codes(xq.codes.astype(code_dtype), wq.codes.astype(code_dtype), grouped_scale,
                     accumulate)
    y = acc.astype(F32) * xq.scale
    if grouped_scale is None:
        y = y * jnp.reshape(wq.scale, wq.scale.shape[-1:] if wq.scale.ndim else ())
    return y.astype(out_dtype), xq, wq, x_rows


def _scaled_int8_product(kernels: bool, gpu: bool, m: int, n: int, k: int):
    """The kernel that takes the integer path's product and its scales in one call, writing
    bf16, where one does (`int8_scaled_dot(codes, row_scale, w_codes (N, K), w_scale)`), else
    None (XLA's int8 dot, then a pass over its int32 sums):
    - on AMX CPUs, ours on the tiles: XLA's dot and that pass took 1.5-2.8x as long at the
      ladder's shapes;
    - on NVIDIA GPUs, the Pallas kernel (`gpu_int8`) where BITNET_JAX_GPU_INT8_EPILOGUE=1 and
      the (m, k) x (k, n) product splits into its blocks: the int32 round trip is most of what
      b1.58 adds to a GPU step; not yet timed, so off by default."""
    if kernels and cpu_int8.kernel_uses_amx():
        return cpu_int8_fused.int8_scaled_dot
    if gpu and gpu_int8.applies(m, n, k):
        return gpu_int8.int8_scaled_dot
    return None


def _kernel_quantizes_x_rows(quantize_x, x_dtype, dtype) -> bool:
    """Whether our CPU kernels can quantize x's rows (`cpu_int8_fused`): bf16 per-token
    absmax/absmean activations of at most 8 bits (`precision.ActivationQuantizer`, TopK
    applied before it)."""
    return (getattr(quantize_x, "kind", None) in ("absmax", "absmean") and quantize_x.bits <= 8
            and x_dtype == dtype == jnp.bfloat16 and cpu_int8_fused.available())


def _fused_activation(quantize_x, quantize_w, x, dtype, integer, kernels, out_dtype):
    """(kind, bits) when the integer path can quantize x inside the CPU kernel, else None.

    The kernel covers the activations of `_kernel_quantizes_x_rows` times weights with one
    scale per tensor or per output feature, and writes bf16. Not on AMX CPUs: there x is
    quantized once for all the linears that share it (`_quantize_activation`) and its codes
    multiplied by our AMX kernel or XLA's int8 dot (`_forward`). `kernels`: whether the step is
    being lowered for the CPU with our kernels present.
    """
    if not (integer and kernels and out_dtype == jnp.bfloat16
            and getattr(quantize_w, "granularity", "group") != "group"
            and _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype)
            and not cpu_int8.kernel_uses_amx()
            and not cpu_int8.xla_int8_is_faster(math.prod(x.shape[:-1]))):
        return None
    return quantize_x.kind, quantize_x.bits


def _int8_forward_product(quantize_x, quantize_w, x, integer, kernels) -> bool:
    """Whether the forward product is taken on int8 codes with int32 sums (on CPUs without AMX
    in the kernel that also quantizes x, `_fused_activation`): always on the integer path, and
    with fake quantization where that gives the same numbers (`_int8_product_is_exact`) faster,
    lowered for a CPU where an int8 product beats XLA's bf16 one (`cpu_int8.int8_beats_bf16`:
    the ternary b1.58 step 5-8% faster on a 2-core Xeon with AMX, 2026-12-04, and 8-10% on a
    2-core AMD EPYC, 2026-12-05). GPUs: `quantized_dot`. Like the X_q^T kernel of the weight
    gradient, an implementation of the fake-quantized path, not a change to it
    (docs/cpu_training_step_history.md).
    """
    if integer:
        return True
    return (kernels and _int8_product_is_exact(quantize_x, quantize_w, x)
            and cpu_int8.int8_beats_bf16(math.prod(x.shape[:-1])))


def _int8_product_is_exact(quantize_x, quantize_w, x) -> bool:
    """Whether fake quantization's forward product has the int8 product's numbers: codes of at
    most 8 bits, one weight scale per tensor or output feature, and every sum of code products
    within float32's exact integers (2^24), so that the product of the codes in bf16 with float32
    accumulation is exact and equals the int32 one."""
    x_bound, w_bound = _code_bound(quantize_x), _code_bound(quantize_w)
    return bool(x_bound and w_bound and getattr(quantize_w, "granularity", "group") != "group"
                and x.shape[-1] * x_bound * w_bound <= 2 ** 24)


def _code_bound(quantizer) -> Optional[int]:
    """A bound on |code| for a quantizer of at most 8 bits (`precision`'s weight and activation
    quantizers: 1 for ternary and binary; k-bit codes lie within `code_range(k)`, absmax
    weights' symmetric range included), else None."""
    bits = getattr(quantizer, "bits", 16)
    if bits > 8:
        return None
    if getattr(quantizer, "kind", None) in ("ternary", "binary"):
        return 1
    return max(abs(end) for end in code_range(int(bits)))


def _activation_row_parameters(quantize_x, x):
    """(x after TopK, per-row multiplier, per-row scale): what the per-token quantizer
    `quantize_x` multiplies, rounds and clips, with the same functions, so that XLA computes
    them once for both."""
    x = topk_per_token(x, quantize_x.keep_ratio)  # x itself at keep_ratio 1
    if quantize_x.kind == "absmax":
        return (x, *absmax_row_parameters(x.astype(F32), code_range(quantize_x.bits)[1],
                                          floor=EPS))
    return (x, *absmean_row_parameters(x.astype(F32), quantize_x.bits))


def _fused_forward(x, w, quantize_x, quantize_w, kind, bits):
    """The integer path with x quantized inside the kernel: y and the backward's residuals
    (x itself, its per-row multiplier and scale, the weight codes (in, out) and scale)."""
    wq = _quantize_weight(quantize_w, w, kernels=True)
    w_codes = wq.codes.astype(jnp.int8)
    w_scale = _per_output_scale(wq, w.shape[-1])
    if kind == "absmax":
        x = topk_per_token(x, quantize_x.keep_ratio)  # the kernel takes the row maxima itself
        y, multiplier, scale = cpu_int8_fused.absmax_quant_dot(x, w_codes.T, w_scale, bits)
    else:  # the mean's rounding depends on the reduction order: XLA computes it, as unfused
        x, multiplier, scale = _activation_row_parameters(quantize_x, x)
        y = cpu_int8_fused.scaled_quant_dot(x, w_codes.T, w_scale, multiplier, scale,
                                            *code_range(bits))
    return y, (_RowQuantizedX(x, multiplier, scale), w_codes, wq.scale, jnp.zeros((), x.dtype),
               jnp.zeros((), w.dtype))


def _per_output_scale(wq, n_out):
    """The weights' scale (one per tensor or per output feature) as our kernels take it: one
    float32 per output feature."""
    return jnp.broadcast_to(jnp.reshape(wq.scale, (-1,)).astype(F32), (n_out,))


class _RowQuantizedX(NamedTuple):
    """x as its per-token quantizer saw it (after TopK) with the quantizer's per-row multiplier
    and scale: from these `cpu_int8_fused.quantize_transpose` writes X_q^T in one pass."""
    x: jax.Array
    multiplier: jax.Array
    scale: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8, 9))
def _quantized_dot(x, w, quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                   out_dtype, gpu):
    int8 = _int8_forward_product(quantize_x, quantize_w, x, integer, kernels)
    fused = _fused_activation(quantize_x, quantize_w, x, dtype, int8, kernels, out_dtype)
    if fused:
        return _fused_forward(x, w, quantize_x, quantize_w, *fused)[0]
    return _forward(x, w, quantize_x, quantize_w, dtype, int8, kernels, out_dtype, gpu)[0]


def _quantized_dot_fwd(x, w, quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                       out_dtype, gpu):
    int8 = _int8_forward_product(quantize_x, quantize_w, x, integer, kernels)
    fused = _fused_activation(quantize_x, quantize_w, x, dtype, int8, kernels, out_dtype)
    if fused:
        return _fused_forward(x, w, quantize_x, quantize_w, *fused)
    y, xq, wq, x_rows = _forward(x, w, quantize_x, quantize_w, dtype, int8, kernels, out_dtype,
                                 gpu)
    if x_rows is not None:
        x_saved = x_rows
    elif kernels and _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype):
        x_saved = _RowQuantizedX(*_activation_row_parameters(quantize_x, x))
    else:  # codes as int8 where they fit: the backward needs only the dequantized operands
        x_saved = (xq.codes.astype(_code_storage_dtype(quantize_x, dtype)), xq.scale)
    residuals = (x_saved, wq.codes.astype(_code_storage_dtype(quantize_w, dtype)), wq.scale,
                 jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    return y, residuals


def _quantized_dot_bwd(quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                       out_dtype, gpu, residuals, g):
    x_saved, w_codes, w_scale, x_like, w_like = residuals
    g = g.astype(dtype)
    # STE: the quantizers count as identity, so d/dx = g W_q^T and d/dW = X_q^T g.
    dx = _input_gradient(g, quantize_w, w_codes, w_scale, dtype, int8_backward, kernels,
                         x_like.dtype)
    dw = _quantized_weight_gradient(x_saved, quantize_x, g, dtype, integer, kernels)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


def _quantized_weight_gradient(x_saved, quantize_x, g, dtype, integer, kernels):
    """dW = X_q^T g (float32) from what the forward saved of x: the row-quantized input, or
    its codes and scale."""
    if isinstance(x_saved, _RowQuantizedX):
        lo_hi = code_range(quantize_x.bits)
        if (cpu_weight_gradient.available() and g.dtype == jnp.bfloat16
                and cpu_int8.bf16_products_take(x_saved.x.shape[-1])):
            # In our kernel (AMX tiles, or AVX512-BF16 vectors) X_q^T is built in L1 by the
            # product, never written: the same numbers as below, bit for bit
            # (docs/cpu_training_step_history.md).
            return cpu_weight_gradient.quantized_weight_gradient(*x_saved, g, *lo_hi)
        # Our kernel writes X_q^T from x and the row parameters in one pass; XLA re-derives the
        # codes inside a slow transposing loop (same numbers; dW in 2.6 against 7.2 ms at
        # 4096 x 512, 2-core Xeon, 2026-12-04; the b1.58 step: docs/cpu_training_step_history.md).
        return _transposed_dot(cpu_int8_fused.quantize_transpose(*x_saved, *lo_hi), g)
    x_codes, x_scale = x_saved
    if integer and kernels and _per_row_int8(x_codes, x_scale) and dtype == jnp.bfloat16:
        # Our kernel writes X_q^T directly from the int8 codes, for the same reason.
        return _transposed_dot(cpu_int8.dequantize_transpose(x_codes, x_scale), g)
    if quantize_x is None:
        return weight_gradient(x_codes, g)
    # Not `weight_gradient`: with dequantized codes its transposed copy cost more than the
    # float32 dot saves (bench_train, 2026-12-02: b1.58 steps 2-7% slower), since XLA folds
    # the dequantization into the float32 conversion it makes anyway.
    return contract_leading(_dequantize_codes(quantize_x, x_codes, x_scale, dtype), g)


def weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """dW = X^T G in float32 for x (..., in) and g (..., out), summed over the leading axes.

    On CPU the product takes x^T as a row-major copy: XLA:CPU keeps a bf16 x bf16 -> f32 dot on
    its bf16 library path (YNNPACK) only when the left operand contracts its last axis in
    row-major layout (`IsDotSupportedByYnn`), and otherwise converts both operands to float32
    for an Eigen dot at half the rate (`OperandUpcaster`). Written as `dot(x, g)` over the
    leading axes, or as `dot(x.T, g)` (XLA folds the transpose into the layout), the weight
    gradient is such a dot; a transpose through a reshape is not folded. Same sums either way,
    up to their order. Elsewhere the backends choose layouts themselves: the plain dot.
    Measured on a 2-core Zen 4 (bench_train, 2026-12-02): the bf16 step of ladder-20m 6% faster.
    """
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])

    def transposed_copy(x2, g2):
        rows, cols = x2.shape
        return _transposed_dot(
            jax.lax.transpose(x2.reshape(rows, cols, 1), (1, 2, 0)).reshape(cols, rows), g2)

    if x2.dtype != jnp.bfloat16:
        return contract_leading(x2, g2)
    return jax.lax.platform_dependent(x2, g2, cpu=transposed_copy, default=contract_leading)


def _transposed_dot(x_t, g):
    """X^T G (float32) from X^T (in, rows) already laid out row-major and g (..., out)."""
    return jax.lax.dot_general(x_t, g.reshape(-1, g.shape[-1]), (((1,), (0,)), ((), ())),
                               preferred_element_type=F32)


def contract_leading(x, g):
    """X^T G (float32) as one dot over the leading axes, its layout left to XLA."""
    axes = tuple(range(g.ndim - 1))
    return jax.lax.dot_general(x, g, ((axes, axes), ((), ())), preferred_element_type=F32)


def _input_gradient(g, quantize_w, w_codes, w_scale, dtype, int8_backward, kernels, dx_dtype):
    """dx = g W_q^T (float32, or bf16 from the kernels; the caller rounds it to `dx_dtype`):
    exact in `dtype` with float32 accumulation, or, with `int8_backward` (weights int8 codes
    with one scale per tensor or output feature), an int8 product (`_int8_input_gradient`). Not
    exact: it rounds g to 8 bits per row."""
    if int8_backward and w_codes.dtype == jnp.int8 and w_scale.ndim <= w_codes.ndim:
        return _int8_input_gradient(g, w_codes, w_scale, kernels)
    if (kernels and quantize_w is not None and g.dtype == dtype == dx_dtype == jnp.bfloat16
            and w_codes.dtype == jnp.int8 and _per_output_feature(w_scale, w_codes.shape[-1])
            and cpu_input_gradient.available()
            and cpu_int8.bf16_products_take(math.prod(g.shape[:-1]))):
        # Our kernel (AMX tiles, or AVX512-BF16 vectors) takes the product from the codes and
        # rounds it to bf16 as XLA's dot and conversion would, bit for bit, in 0.4-0.8x their
        # time on AMX (docs/cpu_training_step_history.md).
        return cpu_input_gradient.codes_input_gradient(g, w_codes, w_scale)
    w_deq = _dequantize_codes(quantize_w, w_codes, w_scale, dtype)
    return jax.lax.dot_general(g, w_deq, (((g.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=F32)


def _int8_input_gradient(g, w_codes, w_scale, kernels):
    """dx = ((codes(g_s) @ W_codes^T) * row_scale) * s_post, with g_s = g times the weight's
    per-output-feature scales (or g itself for one scale per tensor, which is then s_post):
    rows of g_s quantized to 8 bits by absmax with nearest rounding (codes within [-127, 127];
    no 1e-5 floor on the absmax, which would flush small gradients; an all-zero row gives
    zeros). On CPUs with our kernels and one bf16 g per tensor scale, the kernel quantizes g's
    rows while it multiplies (`cpu_int8_fused.absmax_quant_dot`, floor 0), with the same
    numbers: no pass over g writes its codes (on AMX tiles where the kernel has them); where
    only XLA's int8 dot has them (benchmarks' "before"), in one pass before XLA's product
    (`_kernel_quantizes_gradient`)."""
    per_tensor = w_scale.ndim == 0 or w_scale.size == 1
    kernel_rows = _kernel_quantizes_gradient(g, per_tensor, kernels)
    if kernel_rows and (cpu_int8.kernel_uses_amx()
                        or not cpu_int8.xla_int8_is_faster(math.prod(g.shape[:-1]))):
        n_in = w_codes.shape[0]
        scale = jnp.broadcast_to(jnp.reshape(w_scale, ()).astype(F32), (n_in,))
        return cpu_int8_fused.absmax_quant_dot(g, w_codes, scale, 8, floor=0.0)[0]
    post = jnp.reshape(w_scale, ()).astype(F32) if per_tensor else None
    if kernel_rows:  # XLA's int8 product (AMX) on codes from our one-pass row quantizer
        codes, _, row_scale = cpu_int8_fused.absmax_quantize(g, 8, floor=0.0)
        row_scale = row_scale[..., None]
    else:
        g_scaled = (g.astype(F32) if per_tensor
                    else g.astype(F32) * jnp.reshape(w_scale, w_scale.shape[-1:]))
        multiplier, row_scale = absmax_row_parameters(g_scaled, 127, floor=0.0)
        codes = round_clip(g_scaled * multiplier, -127, 127)
    acc = cpu_int8.int8_dot_or_xla(codes.astype(jnp.int8), w_codes)
    dx = acc.astype(F32) * row_scale
    return dx if post is None else dx * post


def _kernel_quantizes_gradient(g, per_tensor: bool, kernels: bool) -> bool:
    """Whether our kernels quantize g's rows for the int8 input gradient (bf16 g, weights with
    one scale per tensor, lowered for the CPU with our kernels): inside the VNNI product, or,
    where XLA takes the int8 product (AMX), in one pass before it (`absmax_quantize`: XLA's
    row maximum and codes fusion would be two operations, `_quantize_activation`)."""
    return (per_tensor and kernels and g.dtype == jnp.bfloat16
            and cpu_int8_fused.available())


def _per_output_feature(scale, n_out: int) -> bool:
    """Whether a weight scale is one per tensor or one per output feature (shape (out,) or
    (1, out)), as the codes (in, out) broadcast it."""
    return scale.size == 1 or (scale.ndim <= 2 and scale.size == n_out
                               and scale.shape[-1] == n_out)


def _per_row_int8(codes, scale) -> bool:
    return codes.dtype == jnp.int8 and scale.shape == (*codes.shape[:-1], 1)


def _dequantize_codes(quantizer, codes, scale, dtype):
    if quantizer is None:
        return codes.astype(dtype)
    return Quantized(codes.astype(F32), scale).dequantize(dtype)


_quantized_dot.defvjp(_quantized_dot_fwd, _quantized_dot_bwd)


def quantized_dot(
    x: jax.Array,
    w: jax.Array,
    quantize_x: Optional[Quantizer] = None,
    quantize_w: Optional[Quantizer] = None,
    dtype=jnp.bfloat16,
    integer: bool = False,
    int8_backward: bool = False,
    out_dtype=None,
) -> jax.Array:
    """`q(x) @ q(w)` for x (..., in) and w (in, out), returned in `out_dtype` (default `dtype`),
    STE gradients. The float32 accumulator is rescaled and rounded once, to `out_dtype`: an
    output head asks for float32 logits, which rounding to bf16 first would make coarse (steps
    of 0.03 at a logit of 5).

    The product is always taken on the integer codes and rescaled afterwards
    (`(x_codes @ w_codes) * x_scale * w_scale`):
    - `integer=False`: codes in `dtype` (bf16 holds integers up to 256 exactly) with float32
      accumulation, which is exact while the sums stay below 2^24 (every ternary recipe), so it
      equals the integer path; there, on AMX CPUs and NVIDIA GPUs, where the int8 product is
      the faster one, it is taken as that product (`_int8_product_is_exact`; on GPUs with
      BITNET_JAX_GPU_INT8_EPILOGUE=1 our Pallas kernel's, `gpu_int8`, on both paths);
    - `integer=True`: int8 x int8 -> int32 `dot_general` (needs both quantizers, at most 8 bits).
    A `None` quantizer leaves that operand in full precision (then `integer` is not possible);
    with both `None` this is a plain `dtype` matmul with float32 accumulation.
    The backward pass uses the dequantized operands in `dtype` (straight-through estimator),
    with float32 accumulation (on AMX CPUs in our kernels, the same bits). On CPU with bf16
    per-token activations the integer path quantizes x inside the int8 kernel
    (`cpu_int8_fused`), with the same results; on CPUs with
    AMX tiles x is quantized once for every linear that shares it, and both paths multiply its
    codes on the tiles in our kernel (`cpu_int8_fused.int8_scaled_dot`).
    `int8_backward=True` (integer path only) computes dx = g W_q^T as an int8 product with g
    rounded to 8 bits per row: faster, NOT exact (see `_input_gradient`); dW stays exact.
    """
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    if integer and (
        quantize_x is None or quantize_w is None
        or getattr(quantize_x, "bits", 16) > 8 or getattr(quantize_w, "bits", 16) > 8
    ):
        raise ValueError(
            "the integer matmul path needs both activations and weights quantized to at most "
            "8 bits; use integer=False for this precision"
        )
    # Full precision goes through the same custom VJP: it also keeps the backward products in
    # `dtype` (autodiff of a dot with float32 accumulation would run them in float32).
    if int8_backward and not integer:
        raise ValueError("int8_backward needs the integer path (integer=True)")
    def dot(kernels, integer=integer, gpu=False):
        return lambda x, w: _quantized_dot(x, w, quantize_x, quantize_w, dtype, integer,
                                           int8_backward, kernels, out_dtype, gpu)

    branches = {}
    # Our CPU kernels: the integer products, and on both paths X_q^T for the weight gradient,
    # the ternary weights' quantization and, on AMX CPUs, x's and the product of its codes.
    # Only where the step is lowered for the CPU: a CPU host that compiles it for a TPU or GPU
    # (`bitnet sweep plan --compile`) gets XLA's path there.
    if (cpu_int8.available() if integer
            else _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype)
            or cpu_ternary.applies(quantize_w, w)):
        branches["cpu"] = dot(True)
    # NVIDIA GPUs: fake quantization as the integer path, where that is exact. Every step timed
    # on both paths ran faster on the integer one (H100, 2026-11-22: ladder-20m, spectra-390m,
    # b1.58-700m; H200, 2026-12-04: b1.58-700m, 0.993 against 1.027x bf16; README, Benchmarks).
    # With BITNET_JAX_GPU_INT8_EPILOGUE=1, on both paths, that product and its scales in one
    # Pallas kernel (`gpu_int8`).
    gpu_kernel = gpu_int8.enabled()
    if (gpu_kernel and integer) or (not integer
                                    and _int8_product_is_exact(quantize_x, quantize_w, x)):
        branches["cuda"] = dot(False, integer=True, gpu=gpu_kernel)
    if not branches:
        return dot(False)(x, w)
    return jax.lax.platform_dependent(x, w, default=dot(False), **branches)


# ----------------------------------------------------------------------------------------------
# Inference on stored codes: weights quantized once, held as integers (out, in), no gradient.


def codes_dot(
    x: jax.Array,
    w_codes_OxI: jax.Array,
    w_scale: jax.Array,
    quantize_x: Optional[Quantizer] = None,
    dtype=jnp.bfloat16,
    integer: bool = False,
    out_dtype=None,
) -> jax.Array:
    """`q(x) @ (codes * scale)` for weight codes stored (out, in), e.g. int8 ternary, returned
    in `out_dtype` (default `dtype`).

    Same numbers as `quantized_dot` on the float weights they came from. The (out, in) layout is
    what the int8 products want: our VNNI kernel (`cpu_int8`) takes it directly, and XLA:CPU's
    own int8 dot is 2x faster with the contracted axis last in both operands (measured at
    decode shapes on an AVX-512 VNNI EPYC). `w_scale` is a scalar or one scale per output
    feature.
    """
    dtype = jnp.dtype(dtype)
    contract = (((x.ndim - 1,), (1,)), ((), ()))
    if integer:
        if quantize_x is None or getattr(quantize_x, "bits", 16) > 8:
            raise ValueError("the integer path needs activations quantized to at most 8 bits")
        xq = quantize_x(x)
        acc = cpu_int8.int8_dot_or_xla(xq.codes.astype(jnp.int8), w_codes_OxI.astype(jnp.int8))
        y = acc.astype(F32) * xq.scale
    else:
        xq = _quantize_or_pass(quantize_x, x)
        y = jax.lax.dot_general(xq.codes.astype(dtype), w_codes_OxI.astype(dtype), contract,
                                preferred_element_type=F32) * xq.scale
    return (y * w_scale.astype(F32)).astype(dtype if out_dtype is None else out_dtype)
