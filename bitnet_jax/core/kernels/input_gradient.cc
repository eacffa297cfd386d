// The input gradient of a quantized linear layer on AMX tiles, as an XLA FFI custom call:
//
//   out[m, k] = bf16(sum_n g[m, n] * w[k, n])     g: (M, N) bf16, codes: (K, N) int8,
//   w[k, n] = bf16(codes[k, n] * scale[n])        scale: (N,) float32, out: (M, K) bf16
//
// w is the layer's weight as the straight-through backward dequantizes it (dx = g W_q^T, W_q
// stored (in, out) = (K, N)), built here from the int8 codes: the float32 product and its
// rounding to bf16 are those of XLA's dequantization, so w holds the same bf16 values.
//
// TDPBF16PS multiplies a 16 x 32 bf16 tile of g (16 rows, 32 consecutive n, read in place) by
// a tile of w holding 16 pairs of consecutive n per column ([n / 2][16 columns][2], the pair
// layout the instruction reads) and adds the 16 x 16 float32 sums.  w is packed once per call
// into panels of 64 columns of out ([N / 2][64] pairs), 16 rows of w at a time through a 16 x 16
// transpose of their pairs; each task then takes 64 rows of g and, per 16 rows, runs every
// panel on four sum tiles (one tile of g, four of w), rounding the sums to bf16 as it stores.
// Rows of g are staged with zeros only where a tile would read past g: the last rows, and every
// row when N is not a multiple of 32.
//
// On CPUs with AVX512-BF16 and no AMX (AMD Zen 4) VDPBF16PS does the same work 16 columns at
// a time: the same panels, each pair of g broadcast to the 16 lanes, 6 rows x 64 columns of
// sums in 24 vector registers.
//
// XLA:CPU's own bf16 dot (YNNPACK) with the dequantization before it and the rounding after it
// ran these products at 0.4-1.3 TFLOP/s at the ladder presets' shapes on a 2-core Xeon with AMX
// (2026-12-05); the int8 input gradient's kernel, which also quantizes g, took 0.4-0.7x its time.
//
// Numbers: each bf16 x bf16 product is exact in float32, and the sums run in n's order in one
// accumulator per output, rounded at every addition, as XLA's own product runs them on each
// kind of CPU: on tiles TDPBF16PS adds a pair's even product first, on vectors VDPBF16PS its odd
// one (both as their instructions' pseudo-code says; XLA's dot on a 2-core AMD EPYC matched the
// latter on every output, 2026-12-05).  Tested bit for bit against XLA's dot and conversion
// (tests/test_cpu_input_gradient.py).  Both instructions treat subnormal inputs as zero and
// flush subnormal sums.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>

#include "amx_tiles.h"
#include "ffi_parallel.h"
#include "kernel_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bitnet_ffi::ParallelFor;
using bitnet_kernels::RoundUp;
using bitnet_kernels::Scratch;
using bitnet_kernels::TailMask16;
using bitnet_kernels::ToBf16x16;
using bitnet_kernels::TransposeDwords16x16;
using bitnet_kernels::VectorSumBlock;

constexpr int64_t kPanelCols = 64;   // columns of out per panel: four 16-column tiles
constexpr int64_t kTaskRows = 64;    // rows of g per task

// 32 weights of row k of w, [n, n + 32), as 16 pairs (bf16(codes * scale), zeros past N).
__attribute__((always_inline)) inline __m512i WeightPairs(const int8_t* codes_row,
                                                          const float* scale, int64_t n,
                                                          int64_t N) {
  __m256i half[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t at = n + 16 * h;
    const __mmask16 m = TailMask16(N - at);
    const __m512 c =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes_row + at)));
    half[h] = ToBf16x16(_mm512_mul_ps(c, _mm512_maskz_loadu_ps(m, scale + at)));
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
}

// Panel p of w: rows [64 p, 64 p + 64) of w (columns of out) as [np / 2][64] pairs, zeros past
// K and N.
void PackPanel(const int8_t* codes, const float* scale, int64_t K, int64_t N, int64_t np,
               int64_t p, uint32_t* panel) {
  for (int64_t c = 0; c < kPanelCols; c += 16) {
    for (int64_t n = 0; n < np; n += 32) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t k = p * kPanelCols + c + j;
        r[j] = k < K ? WeightPairs(codes + k * N, scale, n, N) : _mm512_setzero_si512();
      }
      TransposeDwords16x16(r);  // r[i]: pair n / 2 + i of the 16 rows
      for (int i = 0; i < 16; ++i) {
        _mm512_store_si512(panel + (n / 2 + i) * kPanelCols + c, r[i]);
      }
    }
  }
}

// 16 rows of out, columns [64 p, 64 p + 64): a (16 rows of g, `lda` bytes apart, np / 32
// steps) times panel p, the float32 sums rounded to bf16 and stored for `rows` rows and the
// columns below K.
void PanelTile(const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t np, float* sums,
               int64_t rows, uint16_t* out, int64_t K, int64_t col0) {
  bitnet_amx::PanelSums<bitnet_amx::PanelProduct::kBf16>(a, lda, panel, np / 32, sums);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < kPanelCols; j += 16) {
      const __mmask16 m = TailMask16(K - col0 - j);
      if (!m) break;
      _mm256_mask_storeu_epi16(out + i * K + col0 + j, m,
                               ToBf16x16(_mm512_load_ps(sums + i * kPanelCols + j)));
    }
  }
}

// out from the packed panels w (`panels` of `panel_words` words, np / 2 pairs each) on tiles.
void InputGradientTiles(ffi::ThreadPool& pool, const uint16_t* g, const uint32_t* w,
                        int64_t panels, int64_t panel_words, int64_t np, int64_t M, int64_t N,
                        int64_t K, uint16_t* out) {
  const bool in_place = N % 32 == 0;
  ParallelFor(pool, (M + kTaskRows - 1) / kTaskRows, [&](int64_t t) {
    static thread_local Scratch staging, sums;
    uint16_t* staged = static_cast<uint16_t*>(staging.get(16 * np * sizeof(uint16_t)));
    float* acc = static_cast<float*>(sums.get(16 * kPanelCols * sizeof(float)));
    bitnet_amx::Configure();
    for (int64_t m = t * kTaskRows; m < std::min(M, (t + 1) * kTaskRows); m += 16) {
      const int64_t rows = std::min<int64_t>(16, M - m);
      const uint16_t* a = g + m * N;
      int64_t lda = N * 2;
      if (!in_place || rows < 16) {
        std::memset(staged, 0, 16 * np * sizeof(uint16_t));
        for (int64_t i = 0; i < rows; ++i) std::memcpy(staged + i * np, a + i * N, N * 2);
        a = staged;
        lda = np * 2;
      }
      for (int64_t p = 0; p < panels; ++p) {
        PanelTile(a, lda, w + p * panel_words, np, acc, rows, out + m * K, K, p * kPanelCols);
      }
    }
    bitnet_amx::Release();
  });
}

// One pair of n for R rows of out: acc[r] += pairs[r] (row r's two values of g) times the
// panel's 64 columns of that pair `b`.
template <int R>
__attribute__((target(BITNET_AVX512_BF16_TARGET), always_inline)) inline void PairStep(
    __m512 (&acc)[R][4], const uint32_t* b, const uint32_t (&pairs)[R]) {
  const __m512bh b0 = (__m512bh)_mm512_load_si512(b);
  const __m512bh b1 = (__m512bh)_mm512_load_si512(b + 16);
  const __m512bh b2 = (__m512bh)_mm512_load_si512(b + 32);
  const __m512bh b3 = (__m512bh)_mm512_load_si512(b + 48);
  for (int r = 0; r < R; ++r) {
    const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[r]));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
    acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
  }
}

// Rows [m, m + R) of out, columns [64 p, 64 p + 64): the rows of g (read in place) times panel
// p on VDPBF16PS, one pair of n per step, summed as XLA sums (`VectorSumBlock`: blocks of n,
// then an odd N's last product, as a pair of g's last value and a zero), rounded to bf16 and
// stored for the columns below K.
template <int R>
__attribute__((target(BITNET_AVX512_BF16_TARGET))) void PanelRowsAvx512(
    const uint16_t* g, int64_t N, const uint32_t* panel, uint16_t* out, int64_t K,
    int64_t col0) {
  __m512 acc[R][4];
  alignas(64) float total[R][64];  // the blocks' sums so far, where there are several
  const int64_t even = N - N % 2, block = VectorSumBlock(K);
  uint32_t pairs[R];
  for (int64_t n0 = 0; n0 == 0 || n0 < even; n0 += block) {
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    }
    for (int64_t s = n0 / 2; s < std::min(even, n0 + block) / 2; ++s) {
      for (int r = 0; r < R; ++r) std::memcpy(&pairs[r], g + r * N + 2 * s, sizeof(uint32_t));
      PairStep<R>(acc, panel + s * kPanelCols, pairs);
    }
    if (even <= block) break;
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) {
        float* t = total[r] + 16 * j;
        _mm512_store_ps(t, n0 == 0 ? acc[r][j] : _mm512_add_ps(_mm512_load_ps(t), acc[r][j]));
      }
    }
  }
  if (even > block) {
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_load_ps(total[r] + 16 * j);
    }
  }
  if (N % 2) {
    for (int r = 0; r < R; ++r) pairs[r] = g[r * N + N - 1];
    PairStep<R>(acc, panel + N / 2 * kPanelCols, pairs);
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) {
      const __mmask16 m = TailMask16(K - col0 - 16 * j);
      if (!m) break;
      _mm256_mask_storeu_epi16(out + r * K + col0 + 16 * j, m, ToBf16x16(acc[r][j]));
    }
  }
}

// R rows of out at a time, R = kVectorRows but for the last few.
constexpr int kVectorRows = 6;

template <int R = kVectorRows>
void RowsAvx512(int64_t rows, const uint16_t* g, int64_t N, const uint32_t* panel,
                uint16_t* out, int64_t K, int64_t col0) {
  if constexpr (R > 0) {
    if (rows == R) return PanelRowsAvx512<R>(g, N, panel, out, K, col0);
    return RowsAvx512<R - 1>(rows, g, N, panel, out, K, col0);
  }
}

void InputGradientAvx512(ffi::ThreadPool& pool, const uint16_t* g, const uint32_t* w,
                         int64_t panels, int64_t panel_words, int64_t M, int64_t N, int64_t K,
                         uint16_t* out) {
  ParallelFor(pool, (M + kTaskRows - 1) / kTaskRows, [&](int64_t t) {
    const int64_t m1 = std::min(M, (t + 1) * kTaskRows);
    for (int64_t p = 0; p < panels; ++p) {
      for (int64_t m = t * kTaskRows; m < m1; m += kVectorRows) {
        RowsAvx512(std::min<int64_t>(kVectorRows, m1 - m), g + m * N, N, w + p * panel_words,
                   out + m * K, K, p * kPanelCols);
      }
    }
  });
}

// out = bf16(g w^T), w from the codes: packed once, then multiplied on tiles where the process
// has them, else on AVX512-BF16 vectors: XLA's own product takes the tiles where there are any,
// and the sums' order follows (BITNET_JAX_CPU_AMX chose the routing when the program was
// traced, `cpu_input_gradient.available`).
void InputGradient(ffi::ThreadPool& pool, const uint16_t* g, const int8_t* codes,
                   const float* scale, int64_t M, int64_t N, int64_t K, uint16_t* out) {
  if (M == 0 || K == 0) return;
  if (N == 0) {  // an empty sum; and g has no rows for the tiles to read
    std::memset(out, 0, M * K * sizeof(uint16_t));
    return;
  }
  const int64_t np = RoundUp(N, 32);
  const int64_t panels = (K + kPanelCols - 1) / kPanelCols;
  const int64_t panel_words = np / 2 * kPanelCols;
  static thread_local Scratch packed;
  uint32_t* w = static_cast<uint32_t*>(packed.get(panels * panel_words * sizeof(uint32_t)));
  ParallelFor(pool, panels, [&](int64_t p) {
    PackPanel(codes, scale, K, N, np, p, w + p * panel_words);
  });
  if (bitnet_amx::Granted()) {
    InputGradientTiles(pool, g, w, panels, panel_words, np, M, N, K, out);
  } else {
    InputGradientAvx512(pool, g, w, panels, panel_words, M, N, K, out);
  }
}

ffi::Error CodesInputGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g,
                                  ffi::Buffer<ffi::S8> codes, ffi::Buffer<ffi::F32> scale,
                                  ffi::ResultBuffer<ffi::BF16> out) {
  auto gd = g.dimensions();
  auto cd = codes.dimensions();
  auto sd = scale.dimensions();
  auto od = out->dimensions();
  if (gd.size() != 2 || cd.size() != 2 || sd.size() != 1 || od.size() != 2 || cd[1] != gd[1] ||
      sd[0] != gd[1] || od[0] != gd[0] || od[1] != cd[0]) {
    return ffi::Error::InvalidArgument(
        "bitnet_codes_input_gradient: expects g (M, N), codes (K, N), scale (N,), out (M, K)");
  }
  if (!bitnet_amx::Bf16ProductsRunnable()) {
    return ffi::Error::Internal("bitnet_codes_input_gradient: this CPU has neither AMX tiles "
                                "(with Linux's permission) nor AVX512-BF16");
  }
  InputGradient(pool, reinterpret_cast<const uint16_t*>(g.typed_data()), codes.typed_data(),
                scale.typed_data(), gd[0], gd[1], cd[0],
                reinterpret_cast<uint16_t*>(out->typed_data()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetCodesInputGradient, CodesInputGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
