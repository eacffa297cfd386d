// BitNet b1.58's weight quantization of a float32 weight in one custom call, for XLA:CPU:
//
//   gamma = max(mean |W|, 1e-5),   codes = clip(round_half_even(W * (1 / gamma)), -1, 1)  (int8)
//
// XLA runs the same formula (quant.ternary_absmean) as a reduction and an elementwise fusion, two
// operations per linear layer of a training step; in the step compiled for a 2-core CPU that pair
// costs several percent more than the codes fusion alone (docs/cpu_training_step_history.md), so
// this kernel does both passes in one.
//
// The sum of |W| is taken in float64 over fixed blocks added in block order (the same on any
// number of threads) and rounded once to float32; the mean is that sum times the float32
// reciprocal of n, as XLA compiles jnp.mean (its simplifier turns the division by a constant
// into that product). Where XLA's float32 sum is exact (`codec.exact_latent`'s weights) gamma
// is XLA's; elsewhere it is within an ulp or so of the exact mean, and XLA's sum, in an order
// of its own, may differ from it in the last bits. Given gamma the codes are the formula's bit
// for bit (1 / gamma in float32, then the product, rounded half to even). Work is spread over
// XLA's intra-op thread pool by ffi_parallel.h's ParallelFor.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per task: 256 KiB of weights, a few tasks per weight of the small presets.
constexpr int64_t kBlock = 1 << 16;

// sum |w[i]| over [begin, end), in float64: four accumulators of 8 lanes, 32 floats a step.
double AbsSum(const float* w, int64_t begin, int64_t end) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
                    _mm512_setzero_pd()};
  for (int64_t i = begin; i < end; i += 32) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int64_t left = end - i - 16 * h;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff)
                                     : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
      const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(m, w + i + 16 * h), sign);  // 0 off m
      acc[2 * h] = _mm512_add_pd(acc[2 * h], _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
      acc[2 * h + 1] = _mm512_add_pd(acc[2 * h + 1],
                                     _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1)));
    }
  }
  alignas(64) double lanes[32];
  for (int j = 0; j < 4; ++j) _mm512_store_pd(lanes + 8 * j, acc[j]);
  double sum = 0.0;
  for (double lane : lanes) sum += lane;
  return sum;
}

// codes[i] = clip(round_half_even(w[i] * inv), -1, 1) over [begin, end).
void Codes(const float* w, float inv, int8_t* codes, int64_t begin, int64_t end) {
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = end - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (end - i)) - 1);
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), vinv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    _mm_mask_storeu_epi8(codes + i, m, _mm512_cvtepi32_epi8(c));
  }
}

ffi::Error TernaryAbsmeanImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                              ffi::ResultBuffer<ffi::S8> codes,
                              ffi::ResultBuffer<ffi::F32> gamma) {
  const int64_t n = w.element_count();
  if (codes->element_count() != n || gamma->element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "bitnet_ternary_absmean: expects codes shaped like w and a scalar gamma");
  }
  const float* p = w.typed_data();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  const std::function<void(int64_t)> sum_block = [&](int64_t b) {
    partial[b] = AbsSum(p, b * kBlock, std::min(n, (b + 1) * kBlock));
  };
  bitnet_ffi::ParallelFor(pool, blocks, sum_block);
  double sum = 0.0;
  for (double s : partial) sum += s;  // block order: the same whatever the threads
  const float mean = n ? static_cast<float>(sum) * (1.0f / static_cast<float>(n))
                       : std::numeric_limits<float>::quiet_NaN();  // jnp.mean of nothing
  const float g = mean > 1e-5f || mean != mean ? mean : 1e-5f;  // max(mean, eps), NaN kept
  *gamma->typed_data() = g;
  const float inv = 1.0f / g;
  int8_t* out = codes->typed_data();
  const std::function<void(int64_t)> code_block = [&](int64_t b) {
    Codes(p, inv, out, b * kBlock, std::min(n, (b + 1) * kBlock));
  };
  bitnet_ffi::ParallelFor(pool, blocks, code_block);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryAbsmean, TernaryAbsmeanImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
