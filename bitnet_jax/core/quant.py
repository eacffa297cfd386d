"""Quantizers of the BitNet family as pure jnp functions, and the quantized matmul.

Every quantizer maps an array to a `Quantized` pair (integer-valued codes, float32 scale) with
`value ~= codes * scale`; `.dequantize()` gives the fake-quantized array. Scales are computed in
float32 whatever the input dtype, and fake-quantized results come back in the input dtype.
Reductions are plain `jnp` reductions, so under `jax.jit` a per-tensor mean over a sharded weight
is the global mean (GSPMD inserts the all-reduce).

Conventions: weights are Flax kernels `(in_features, out_features)`; activations have their
feature axis last ("per token" = one scale per row of the last axis). Formulas: see
shared/reference/bitnet.md; each function names the paper it transcribes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bitnet_jax.core import cpu_int8, cpu_int8_fused

EPS = 1e-5
F32 = jnp.float32


class Quantized(NamedTuple):
    """Integer-valued `codes` (float32 storage) and a float32 `scale`: value = codes * scale.

    `scale` broadcasts against `codes`, except for per-group weight scales, which have shape
    `(groups, 1, out)` for codes `(in, out)` (groups of consecutive input features).
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def is_grouped(self) -> bool:
        return self.scale.ndim == self.codes.ndim + 1

    def dequantize(self, dtype=F32) -> jax.Array:
        if self.is_grouped:
            n_in, n_out = self.codes.shape
            grouped = self.codes.reshape(self.scale.shape[0], -1, n_out) * self.scale
            return grouped.reshape(n_in, n_out).astype(dtype)
        return (self.codes * self.scale).astype(dtype)


# A quantizer is any hashable callable array -> Quantized (precision.py builds them from recipes).
Quantizer = Callable[[jax.Array], Quantized]


def round_clip(x: jax.Array, lo: float, hi: float) -> jax.Array:
    """RoundClip(x, lo, hi) = max(lo, min(hi, round(x))), round half to even as numpy does."""
    return jnp.clip(jnp.round(x), lo, hi)


def ste(x: jax.Array, quantized: jax.Array) -> jax.Array:
    """Straight-through estimator: forward value `quantized`, gradient exactly identity.

    Written as `x - sg(x) + sg(q)` rather than `x + sg(q - x)`: in bfloat16 the latter rounds
    `q - x` and does not give back `q` exactly.
    """
    return x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(quantized.astype(x.dtype))


def fake_quantize(quantizer: Quantizer, x: jax.Array) -> jax.Array:
    """Quantize-dequantize `x` with an STE gradient, in `x`'s dtype."""
    return ste(x, quantizer(x).dequantize(x.dtype))


# ----------------------------------------------------------------------------------------------
# Weights: per tensor (default), per output channel, or per group of `group_size` input features.


def _weight_reduce(w: jax.Array, fn, granularity: str, group_size: Optional[int]) -> jax.Array:
    """Reduce `fn` (a jnp reduction) over the axes a weight scale is shared across.

    Returns the statistic shaped to broadcast against `w` (or `(groups, 1, out)` for groups).
    """
    if granularity == "tensor":
        return fn(w)
    if granularity == "channel":  # one scale per output feature (last axis)
        return fn(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
    if granularity == "group":
        if w.ndim != 2 or not group_size or w.shape[0] % group_size:
            raise ValueError(
                f"group granularity needs a 2-D kernel whose input size is a multiple of "
                f"group_size; got shape {w.shape} and group_size={group_size}"
            )
        grouped = w.reshape(w.shape[0] // group_size, group_size, w.shape[1])
        return fn(grouped, axis=1, keepdims=True)
    raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}")


def _apply_grouped(w: jax.Array, stat: jax.Array, fn) -> jax.Array:
    """Apply elementwise `fn(w, stat)` where `stat` may be per-group `(G, 1, out)`."""
    if stat.ndim == w.ndim + 1:
        grouped = w.reshape(stat.shape[0], -1, w.shape[-1])
        return fn(grouped, stat).reshape(w.shape)
    return fn(w, stat)


def ternary_absmean(
    w: jax.Array, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """BitNet b1.58 ternary weights: gamma = max(mean|W|, eps), codes = RoundClip(W/gamma, -1, 1).

    Follows the released code (gamma clamped to 1e-5 instead of adding eps).
    """
    w32 = w.astype(F32)
    gamma = jnp.maximum(_weight_reduce(jnp.abs(w32), jnp.mean, granularity, group_size), EPS)
    codes = _apply_grouped(w32, gamma, lambda v, g: round_clip(v * (1.0 / g), -1, 1))
    return Quantized(codes, gamma)


def ternary_latent(
    codes: jax.Array, gamma: jax.Array, granularity: str = "tensor",
    group_size: Optional[int] = None,
) -> jax.Array:
    """Float weights that `ternary_absmean` maps back to exactly these `codes` and scale `gamma`.

    Released ternary checkpoints store codes and a scale, while training keeps float weights.
    W = codes * gamma / p, with p the fraction of nonzero codes (per scale group), has
    mean|W| = gamma and |W| / gamma = 1 / p >= 1 where codes are nonzero, which rounds and clips
    back to +-1: importing such a checkpoint and training on from it starts from the same model.
    """
    codes32 = codes.astype(F32)
    nonzero = _weight_reduce(jnp.abs(codes32), jnp.mean, granularity, group_size)
    scale = jnp.asarray(gamma, F32) / jnp.where(nonzero > 0, nonzero, 1.0)
    return _apply_grouped(codes32, scale, lambda c, s: c * s)


def binary_sign(
    w: jax.Array, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """BitNet (2023) binary weights: codes = Sign(W - mean(W)) with Sign(0) = -1, scale mean|W|."""
    w32 = w.astype(F32)
    alpha = _weight_reduce(w32, jnp.mean, granularity, group_size)
    beta = _weight_reduce(jnp.abs(w32), jnp.mean, granularity, group_size)
    codes = _apply_grouped(w32, alpha, lambda v, a: jnp.where(v - a > 0, 1.0, -1.0))
    return Quantized(codes, beta)


def absmax_weight(
    w: jax.Array, bits: int, granularity: str = "tensor", group_size: Optional[int] = None
) -> Quantized:
    """Symmetric k-bit absmax weights (for generic wXaY sweeps): codes in [-(2^(k-1)-1), 2^(k-1)-1]."""
    q_max = 2 ** (bits - 1) - 1
    w32 = w.astype(F32)
    absmax = jnp.maximum(_weight_reduce(jnp.abs(w32), jnp.max, granularity, group_size), EPS)
    codes = _apply_grouped(w32, absmax, lambda v, m: round_clip(v * (q_max / m), -q_max, q_max))
    return Quantized(codes, absmax / q_max)


# ----------------------------------------------------------------------------------------------
# Activations: per token (one scale per row of the last axis).


def absmax_per_token(x: jax.Array, bits: int = 8) -> Quantized:
    """BitNet b1.58 k-bit absmax activations, no zero point.

    s = Q / max(max|x|, eps) with Q = 2^(k-1) - 1; codes = clip(round(x * s), -Q - 1, Q).
    """
    lo, q_max = _code_range(bits)
    x32 = x.astype(F32)
    multiplier, scale = _absmax_row_parameters(x32, q_max, floor=EPS)
    codes = round_clip(x32 * multiplier, lo, q_max)
    return Quantized(codes, scale)


def absmean_per_token(x: jax.Array, bits: int = 4) -> Quantized:
    """BitNet a4.8 absmean activations: Q4(x) = beta/sqrt(7) * RoundClip(sqrt(7) x / (beta + eps), -8, 7).

    beta = mean|x| per token. For other bit widths sqrt(7) generalises to sqrt(2^(k-1) - 1).
    """
    x32 = x.astype(F32)
    multiplier, scale = _absmean_row_parameters(x32, bits)
    codes = round_clip(x32 * multiplier, *_code_range(bits))
    return Quantized(codes, scale)


def _code_range(bits: int) -> tuple[int, int]:
    """Codes of k-bit per-token activations (absmax and absmean alike): [-2^(k-1), 2^(k-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _absmax_row_parameters(x32: jax.Array, q_max: int, floor: float
                           ) -> tuple[jax.Array, jax.Array]:
    """(multiplier taking x to codes, scale taking codes back), each (..., 1), for absmax rows:
    max|x| raised to at least `floor`, or with floor 0 an all-zero row taken as 1. The CPU
    kernel (`cpu_int8_fused.absmax_quant_dot`) computes the same numbers."""
    absmax = row_absmax(x32)
    absmax = jnp.maximum(absmax, floor) if floor > 0 else jnp.where(absmax > 0, absmax, 1.0)
    # q_max * (1 / absmax), not q_max / absmax: the reference code (and transformers) writes
    # `127 / t` in torch, which evaluates `t.reciprocal() * 127`; dividing differs by an ulp for
    # a quarter of tokens and moves a code by one where x * scale sits on a .5 tie.
    return jnp.reciprocal(absmax) * q_max, absmax / q_max


def row_absmax(x: jax.Array) -> jax.Array:
    """max|x| over the last axis, (..., 1), as max(max x, -min x) from one two-output reduction:
    XLA:CPU hands a lone max-reduction to its library (YNNPACK) behind a pass writing a float32
    copy of the activations, and keeps this one in its own loop (README, Benchmarks: the
    quantizer alone in 0.33-0.72x the time)."""
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(jnp.inf, x.dtype))
    high, low = jax.lax.reduce(
        (x, x), init, lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
        (x.ndim - 1,))
    return jnp.maximum(high, -low)[..., None]


def _absmean_row_parameters(x32: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """(multiplier taking x to codes, scale taking codes back), each (..., 1), for absmean."""
    root = math.sqrt(2 ** (bits - 1) - 1)
    beta = jnp.mean(jnp.abs(x32), axis=-1, keepdims=True)
    return root / (beta + EPS), beta / root


def topk_count(n: int, keep_ratio: float) -> int:
    """Entries kept per token: ceil(keep_ratio * n), at least 1 (guarding float fuzz: 0.3*10)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return min(n, max(1, math.ceil(keep_ratio * n - 1e-9)))


def topk_per_token(x: jax.Array, keep_ratio: float = 0.5) -> jax.Array:
    """BitNet a4.8 TopK sparsification: keep the k = ceil(ratio * n) largest |x| of each token.

    Entries tied with the k-th largest magnitude are all kept (a threshold, not a scatter: cheap and
    elementwise, so it shards like any activation).
    """
    k = topk_count(x.shape[-1], keep_ratio)
    if k == x.shape[-1]:
        return x
    magnitude = jnp.abs(x)
    threshold = jax.lax.top_k(magnitude, k)[0][..., -1:]
    return jnp.where(magnitude >= threshold, x, jnp.zeros_like(x))


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


def _forward(x, w, quantize_x, quantize_w, dtype, integer, out_dtype):
    xq = _quantize_or_pass(quantize_x, x)
    wq = _quantize_or_pass(quantize_w, w)
    code_dtype = jnp.int8 if integer else dtype
    accumulate = jnp.int32 if integer else F32
    grouped_scale = wq.scale if wq.is_grouped else None
    acc = _dot_codes(xq.codes.astype(code_dtype), wq.codes.astype(code_dtype), grouped_scale,
                     accumulate)
    y = acc.astype(F32) * xq.scale
    if grouped_scale is None:
        y = y * jnp.reshape(wq.scale, wq.scale.shape[-1:] if wq.scale.ndim else ())
    return y.astype(out_dtype), xq, wq


def _kernel_quantizes_x_rows(quantize_x, x_dtype, dtype) -> bool:
    """Whether our CPU kernels can quantize x's rows (`cpu_int8_fused`): bf16 per-token
    absmax/absmean activations of at most 8 bits (`precision.ActivationQuantizer`, TopK
    applied before it)."""
    return (getattr(quantize_x, "kind", None) in ("absmax", "absmean") and quantize_x.bits <= 8
            and x_dtype == dtype == jnp.bfloat16 and cpu_int8_fused.available())


def _fused_activation(quantize_x, quantize_w, x, dtype, integer, kernels, out_dtype):
    """(kind, bits) when the integer path can quantize x inside the CPU kernel, else None.

    The kernel covers the activations of `_kernel_quantizes_x_rows` times weights with one
    scale per tensor or per output feature, and writes bf16; not where XLA's int8 dot is faster.
    `kernels`: whether the step is being lowered for the CPU with our kernels present.
    """
    if not (integer and kernels and out_dtype == jnp.bfloat16
            and getattr(quantize_w, "granularity", "group") != "group"
            and _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype)
            and not cpu_int8.xla_int8_is_faster(math.prod(x.shape[:-1]))):
        return None
    return quantize_x.kind, quantize_x.bits


def _int8_forward_product(quantize_x, quantize_w, x, integer, kernels) -> bool:
    """Whether the forward product is taken on int8 codes with int32 sums: always on the integer
    path, and with fake quantization where that gives the same numbers faster.

    Same numbers: codes of at most 8 bits, one weight scale per tensor or output feature, and
    every sum of code products within float32's exact integers (2^24), so that the bf16 codes'
    product with float32 accumulation is exact and equals the int32 one. Faster: lowered for a
    CPU on which XLA's int8 dot beats its bf16 dot (AMX; `cpu_int8.xla_int8_is_faster`): the
    ternary b1.58 step 5-8% faster on a 2-core Xeon (README, Benchmarks). Like the X_q^T kernel
    of the weight gradient, an implementation of the fake-quantized path, not a change to it.
    """
    if integer:
        return True
    if not (kernels and _code_bound(quantize_x) and _code_bound(quantize_w)
            and getattr(quantize_w, "granularity", "group") != "group"):
        return False
    exact = x.shape[-1] * _code_bound(quantize_x) * _code_bound(quantize_w) <= 2 ** 24
    return exact and cpu_int8.xla_int8_is_faster(math.prod(x.shape[:-1]))


def _code_bound(quantizer) -> Optional[int]:
    """A bound on |code| for a quantizer of at most 8 bits (`precision`'s weight and activation
    quantizers: 1 for ternary and binary, 2^(k-1) for k bits), else None."""
    bits = getattr(quantizer, "bits", 16)
    if bits > 8:
        return None
    return 1 if getattr(quantizer, "kind", None) in ("ternary", "binary") else 2 ** (int(bits) - 1)


def _activation_row_parameters(quantize_x, x):
    """(x after TopK, per-row multiplier, per-row scale): what the per-token quantizer
    `quantize_x` multiplies, rounds and clips, with the same functions, so that XLA computes
    them once for both."""
    x = topk_per_token(x, quantize_x.keep_ratio)  # x itself at keep_ratio 1
    if quantize_x.kind == "absmax":
        return (x, *_absmax_row_parameters(x.astype(F32), _code_range(quantize_x.bits)[1],
                                           floor=EPS))
    return (x, *_absmean_row_parameters(x.astype(F32), quantize_x.bits))


def _fused_forward(x, w, quantize_x, quantize_w, kind, bits):
    """The integer path with x quantized inside the kernel: y and the backward's residuals
    (x itself, its per-row multiplier and scale, the weight codes (in, out) and scale)."""
    wq = quantize_w(w)
    w_codes = wq.codes.astype(jnp.int8)
    w_scale = jnp.broadcast_to(wq.scale.reshape(-1), (w.shape[-1],)).astype(F32)
    if kind == "absmax":
        x = topk_per_token(x, quantize_x.keep_ratio)  # the kernel takes the row maxima itself
        y, multiplier, scale = cpu_int8_fused.absmax_quant_dot(x, w_codes.T, w_scale, bits)
    else:  # the mean's rounding depends on the reduction order: XLA computes it, as unfused
        x, multiplier, scale = _activation_row_parameters(quantize_x, x)
        y = cpu_int8_fused.scaled_quant_dot(x, w_codes.T, w_scale, multiplier, scale,
                                            *_code_range(bits))
    return y, (_RowQuantizedX(x, multiplier, scale), w_codes, wq.scale, jnp.zeros((), x.dtype),
               jnp.zeros((), w.dtype))


class _RowQuantizedX(NamedTuple):
    """x as its per-token quantizer saw it (after TopK) with the quantizer's per-row multiplier
    and scale: from these `cpu_int8_fused.quantize_transpose` writes X_q^T in one pass."""
    x: jax.Array
    multiplier: jax.Array
    scale: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _quantized_dot(x, w, quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                   out_dtype):
    fused = _fused_activation(quantize_x, quantize_w, x, dtype, integer, kernels,
                              out_dtype)
    if fused:
        return _fused_forward(x, w, quantize_x, quantize_w, *fused)[0]
    integer = _int8_forward_product(quantize_x, quantize_w, x, integer, kernels)
    return _forward(x, w, quantize_x, quantize_w, dtype, integer, out_dtype)[0]


def _quantized_dot_fwd(x, w, quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                       out_dtype):
    fused = _fused_activation(quantize_x, quantize_w, x, dtype, integer, kernels,
                              out_dtype)
    if fused:
        return _fused_forward(x, w, quantize_x, quantize_w, *fused)
    y, xq, wq = _forward(x, w, quantize_x, quantize_w, dtype,
                         _int8_forward_product(quantize_x, quantize_w, x, integer, kernels),
                         out_dtype)
    if kernels and _kernel_quantizes_x_rows(quantize_x, x.dtype, dtype):
        x_saved = _RowQuantizedX(*_activation_row_parameters(quantize_x, x))
    else:  # codes as int8 where they fit: the backward needs only the dequantized operands
        x_saved = (xq.codes.astype(_code_storage_dtype(quantize_x, dtype)), xq.scale)
    residuals = (x_saved, wq.codes.astype(_code_storage_dtype(quantize_w, dtype)), wq.scale,
                 jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))
    return y, residuals


def _quantized_dot_bwd(quantize_x, quantize_w, dtype, integer, int8_backward, kernels,
                       out_dtype, residuals, g):
    x_saved, w_codes, w_scale, x_like, w_like = residuals
    g = g.astype(dtype)
    # STE: the quantizers count as identity, so d/dx = g W_q^T and d/dW = X_q^T g.
    dx = _input_gradient(g, quantize_w, w_codes, w_scale, dtype, int8_backward, kernels)
    dw = _quantized_weight_gradient(x_saved, quantize_x, g, dtype, integer, kernels)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


def _quantized_weight_gradient(x_saved, quantize_x, g, dtype, integer, kernels):
    """dW = X_q^T g (float32) from what the forward saved of x: the row-quantized input, or
    its codes and scale."""
    if isinstance(x_saved, _RowQuantizedX):
        # Our kernel writes X_q^T from x and the row parameters in one pass; XLA re-derives the
        # codes inside a slow transposing loop (same numbers; dW in 2.6 against 7.2 ms at
        # 4096 x 512, 2-core Xeon, 2026-12-04; the b1.58 step: README, Benchmarks).
        x_q_T = cpu_int8_fused.quantize_transpose(*x_saved, *_code_range(quantize_x.bits))
        return _transposed_dot(x_q_T, g)
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


def _input_gradient(g, quantize_w, w_codes, w_scale, dtype, int8_backward, kernels):
    """dx = g W_q^T (float32, or bf16 from the kernel): exact in `dtype` with float32
    accumulation, or, with `int8_backward` (weights int8 codes with one scale per tensor or
    output feature), an int8 product (`_int8_input_gradient`). Not exact: it rounds g to 8 bits
    per row."""
    if int8_backward and w_codes.dtype == jnp.int8 and w_scale.ndim <= w_codes.ndim:
        return _int8_input_gradient(g, w_codes, w_scale, kernels)
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
    numbers: no pass over g writes its codes (not where XLA's int8 dot is faster: AMX)."""
    per_tensor = w_scale.ndim == 0 or w_scale.size == 1
    if (per_tensor and kernels and g.dtype == jnp.bfloat16 and cpu_int8_fused.available()
            and not cpu_int8.xla_int8_is_faster(math.prod(g.shape[:-1]))):
        n_in = w_codes.shape[0]
        scale = jnp.broadcast_to(jnp.reshape(w_scale, ()).astype(F32), (n_in,))
        return cpu_int8_fused.absmax_quant_dot(g, w_codes, scale, 8, floor=0.0)[0]
    if per_tensor:
        g_scaled, post = g.astype(F32), jnp.reshape(w_scale, ()).astype(F32)
    else:
        g_scaled, post = g.astype(F32) * jnp.reshape(w_scale, w_scale.shape[-1:]), None
    multiplier, row_scale = _absmax_row_parameters(g_scaled, 127, floor=0.0)
    codes = round_clip(g_scaled * multiplier, -127, 127)
    acc = cpu_int8.int8_dot_or_xla(codes.astype(jnp.int8), w_codes)
    dx = acc.astype(F32) * row_scale
    return dx if post is None else dx * post


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
      accumulation, which is exact for integer codes, so it equals the integer path (and on
      CPUs where XLA's int8 dot is the faster one, AMX, it is taken as that product:
      `_int8_forward_product`);
    - `integer=True`: int8 x int8 -> int32 `dot_general` (needs both quantizers, at most 8 bits).
    A `None` quantizer leaves that operand in full precision (then `integer` is not possible);
    with both `None` this is a plain `dtype` matmul with float32 accumulation.
    The backward pass uses the dequantized operands in `dtype` (straight-through estimator),
    with float32 accumulation. On CPU with bf16 per-token activations the integer path
    quantizes x inside the int8 kernel (`cpu_int8_fused`), with the same results, except
    where XLA's own int8 dot is faster (AMX: `cpu_int8.xla_int8_is_faster`).
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
    def dot(kernels):
        return lambda x, w: _quantized_dot(x, w, quantize_x, quantize_w, dtype, integer,
                                           int8_backward, kernels, out_dtype)

    # Our CPU kernels: the integer products, and on both paths X_q^T for the weight gradient.
    if not (cpu_int8.available() if integer else _kernel_quantizes_x_rows(quantize_x, x.dtype,
                                                                          dtype)):
        return dot(False)(x, w)
    # Only where the step is lowered for the CPU: a CPU host that compiles it for a TPU or GPU
    # (`bitnet sweep plan --compile`) gets XLA's path there.
    return jax.lax.platform_dependent(x, w, cpu=dot(True), default=dot(False))


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
