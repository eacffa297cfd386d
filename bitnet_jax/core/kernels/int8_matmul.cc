// Exact int8 x int8 -> int32 matmul for XLA:CPU, as an XLA FFI custom call; below it, the
// dequantize-and-transpose of int8 activations for the weight gradient, and the same product
// with per-token activation quantization fused in (bf16 in, bf16 out) plus its backward helper,
// that quantization alone (see "Activation quantization fused into the product"), and the
// product of codes quantized beforehand with the same bf16 epilogue.
//
//   out[m, n] = sum_k x[m, k] * w[n, k]      x: (M, K) int8, w: (N, K) int8 ("out x in")
//
// AVX512-VNNI's vpdpbusd multiplies UNSIGNED bytes by SIGNED bytes.  Two paths:
//
//  * Packed path (M > 16, or M > 64 for big weights: the training shapes).  The weights are re-packed once per
//    call into panels of NR = 16 * NRV output columns: for every group of 4 consecutive k, one
//    64-byte block per zmm holds 16 columns x 4 bytes, and every byte is stored as the unsigned
//    value w + 128 (= w ^ 0x80).  The activations stay signed and are broadcast 4 bytes at a
//    time, so no pass over x is needed:
//        sum_k x * (w + 128) - 128 * sum_k x  ==  sum_k x * w
//    The accumulators start at -128 * rowsum(x).  Padding bytes of the packed weights are 0
//    (unsigned), so they contribute nothing whatever x holds there.
//
//  * On CPUs with AMX-INT8 the packed path multiplies on AMX tiles instead (signed x signed,
//    so the panels keep w's own bytes and no correction is needed; "Packed path on AMX tiles").
//
//  * Direct path (small M, decode).  Memory-bound on the weights, so they are read in place
//    (no packing pass): x is shifted once to unsigned (x ^ 0x80, zero padded to a multiple of
//    64 bytes), w rows are the signed operand, and a second vpdpbusd with all-ones computes
//    sum_k w[n, k] for the correction  - 128 * sum_k w.
//
// int32 arithmetic wraps (vpdpbusd is the non-saturating form), so the result is exact modulo
// 2^32 whatever the intermediate values, i.e. bit-identical to XLA's int32-accumulating dot.
//
// Work is spread over XLA's intra-op thread pool (xla::ffi::ThreadPool) by ffi_parallel.h's
// ParallelFor, the loop every kernel in this directory shares.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "amx_tiles.h"
#include "ffi_parallel.h"
#include "kernel_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int NRV = 4;             // zmm registers of output columns per micro-tile
constexpr int NR = 16 * NRV;       // output columns per packed panel
constexpr int MR = 6;              // rows of x per micro-tile (MR * NRV accumulators)
constexpr int64_t kMaxRowBlock = 40 * MR;  // rows of x per packed-path task
#ifndef BITNET_INT8_DIRECT_MAX_M
#define BITNET_INT8_DIRECT_MAX_M 16
#endif
constexpr int64_t kDirectMaxM = BITNET_INT8_DIRECT_MAX_M;

// The direct (unpacked) product for few rows; up to 4x as many when the weights are big
// (packing them would cost as much memory traffic as the product).
inline bool UseDirectPath(int64_t M, int64_t N, int64_t K) {
  return M <= kDirectMaxM || (M <= 4 * kDirectMaxM && N * K >= (int64_t{4} << 20));
}

// acc += dot4(a as u8, b as s8) per 32-bit lane.  Inline asm ties the accumulator to the
// destination register; with the intrinsic GCC 12 copies and spills every accumulator.
__attribute__((always_inline)) inline __m512i Dpbusd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

using bitnet_ffi::ParallelFor;  // the loop on XLA's intra-op pool (ffi_parallel.h)

using bitnet_kernels::Bf16ToF32;
using bitnet_kernels::Bf16ToF32x16;
using bitnet_kernels::Codes16;
using bitnet_kernels::Scratch;
using bitnet_kernels::TailMask16;
using bitnet_kernels::ToBf16;
using bitnet_kernels::ToBf16x16;
using bitnet_kernels::TransposeDwords16x16;

// ----------------------------------------------------------------------------------------
// Packed path.
// ----------------------------------------------------------------------------------------

// Packs panel p (columns p*NR .. p*NR+NR-1) of w into dst: [kg][NR][4] bytes, each byte
// w ^ flip: unsigned w + 128 for VNNI (flip 0x80808080), w itself for AMX (flip 0).
void PackPanel(const int8_t* w, int64_t N, int64_t K, int64_t p, uint8_t* dst,
               uint32_t flip_bytes = 0x80808080u) {
  const int64_t kgs = (K + 3) / 4;
  const int64_t kfull = K / 4;
  const int64_t n0 = p * NR;
  const int64_t ncols = std::min<int64_t>(NR, N - n0);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  if (ncols == NR) {
    // 16 x 16 transposes of 32-bit words: 16 rows of w, 16 k-groups at a time.
    int64_t kg = 0;
    const __m512i flip = _mm512_set1_epi32(static_cast<int>(flip_bytes));
    for (; kg + 16 <= kfull; kg += 16) {
      for (int cb = 0; cb < NR; cb += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = _mm512_xor_si512(
              _mm512_loadu_si512(w + (n0 + cb + i) * K + kg * 4), flip);
        }
        TransposeDwords16x16(r);
        for (int j = 0; j < 16; ++j) {
          _mm512_storeu_si512(d + (kg + j) * NR + cb, r[j]);
        }
      }
    }
    for (; kg < kgs; ++kg) {
      for (int c = 0; c < NR; ++c) {
        const int8_t* src = w + (n0 + c) * K + kg * 4;
        uint32_t v = 0;
        int64_t nb = std::min<int64_t>(4, K - kg * 4);
        std::memcpy(&v, src, nb);
        uint32_t mask = nb == 4 ? 0xffffffffu : ((1u << (8 * nb)) - 1u);
        d[kg * NR + c] = (v ^ flip_bytes) & mask;
      }
    }
  } else {
    for (int64_t kg = 0; kg < kgs; ++kg) {
      for (int c = 0; c < NR; ++c) {
        uint32_t v = 0, mask = 0;
        if (c < ncols) {
          int64_t nb = std::min<int64_t>(4, K - kg * 4);
          std::memcpy(&v, w + (n0 + c) * K + kg * 4, nb);
          mask = nb == 4 ? 0xffffffffu : ((1u << (8 * nb)) - 1u);
        }
        d[kg * NR + c] = (v ^ flip_bytes) & mask;
      }
    }
  }
}

// rows x NR micro-tile: out[rows, ncols] for a packed panel.
// OutT int32_t: the raw products.  OutT uint16_t (bfloat16 bits): the fused epilogue
// bf16((float(acc) * rs[i]) * cs[n]), rounded as XLA rounds `(acc * x_scale) * w_scale`.
template <int ROWS, typename OutT>
__attribute__((always_inline)) inline void MicroKernel(
    const int8_t* __restrict x, int64_t K, const uint8_t* __restrict wp,
    const int32_t* __restrict corr, OutT* __restrict out, int64_t ldo, int ncols,
    const float* __restrict rs, const float* __restrict cs) {
  __m512i acc[ROWS][NRV];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) {
    __m512i c = _mm512_set1_epi32(corr[i]);
#pragma GCC unroll 4
    for (int j = 0; j < NRV; ++j) acc[i][j] = c;
  }
  const int64_t kfull = K / 4;
  const int8_t* xr[ROWS];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) xr[i] = x + i * K;
  for (int64_t kg = 0; kg < kfull; ++kg) {
    __m512i wv[NRV];
#pragma GCC unroll 4
    for (int j = 0; j < NRV; ++j) wv[j] = _mm512_load_si512(wp + (kg * NRV + j) * 64);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      int32_t xv;
      std::memcpy(&xv, xr[i] + kg * 4, 4);
      __m512i xb = _mm512_set1_epi32(xv);
#pragma GCC unroll 4
      for (int j = 0; j < NRV; ++j) acc[i][j] = Dpbusd(acc[i][j], wv[j], xb);
    }
  }
  if (K & 3) {
    const int64_t kg = kfull;
    const int nb = static_cast<int>(K & 3);
    __m512i wv[NRV];
#pragma GCC unroll 4
    for (int j = 0; j < NRV; ++j) wv[j] = _mm512_load_si512(wp + (kg * NRV + j) * 64);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      int32_t xv = 0;
      std::memcpy(&xv, xr[i] + kg * 4, nb);
      __m512i xb = _mm512_set1_epi32(xv);
#pragma GCC unroll 4
      for (int j = 0; j < NRV; ++j) acc[i][j] = Dpbusd(acc[i][j], wv[j], xb);
    }
  }
  if constexpr (std::is_same_v<OutT, uint16_t>) {
    __m512 col[NRV];
    __mmask16 cm[NRV];
#pragma GCC unroll 4
    for (int j = 0; j < NRV; ++j) {
      cm[j] = TailMask16(ncols - j * 16);
      col[j] = _mm512_maskz_loadu_ps(cm[j], cs + j * 16);
    }
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      const __m512 r = _mm512_set1_ps(rs[i]);
#pragma GCC unroll 4
      for (int j = 0; j < NRV; ++j) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][j]), r), col[j]);
        _mm256_mask_storeu_epi16(out + i * ldo + j * 16, cm[j], ToBf16x16(v));
      }
    }
  } else if (ncols == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < NRV; ++j) _mm512_storeu_si512(out + i * ldo + j * 16, acc[i][j]);
    }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < NRV; ++j) {
        int rem = ncols - j * 16;
        if (rem <= 0) break;
        __mmask16 m = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1u);
        _mm512_mask_storeu_epi32(out + i * ldo + j * 16, m, acc[i][j]);
      }
    }
  }
}

// -128 * sum_k x[m, k] for rows [0, rows).
void RowCorrections(const int8_t* x, int64_t K, int64_t rows, int32_t* corr) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < rows; ++i) {
    const int8_t* r = x + i * K;
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      acc = Dpbusd(acc, ones, _mm512_loadu_si512(r + k));
    }
    int32_t s = _mm512_reduce_add_epi32(acc);
    for (; k < K; ++k) s += r[k];
    corr[i] = static_cast<int32_t>(-128u * static_cast<uint32_t>(s));
  }
}

// Phase 1 of both packed paths: every panel of w packed (`PackPanel`, bytes ^ `flip_bytes`),
// `kg_rows` >= ceil(K / 4) k-groups per panel, the rows past K zero; a few panels per task.
template <typename PF>
const uint8_t* PackPanels(PF&& parallel_for, const int8_t* w, int64_t N, int64_t K,
                          int64_t kg_rows, uint32_t flip_bytes, Scratch& scratch) {
  const int64_t kgs = (K + 3) / 4;
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t panel_bytes = kg_rows * NR * 4;
  uint8_t* wp = static_cast<uint8_t*>(scratch.get(panels * panel_bytes));
  const int64_t pack_per_task = 4;
  const std::function<void(int64_t)> pack = [&](int64_t t) {
    int64_t p1 = std::min(panels, (t + 1) * pack_per_task);
    for (int64_t p = t * pack_per_task; p < p1; ++p) {
      uint8_t* dst = wp + p * panel_bytes;
      PackPanel(w, N, K, p, dst, flip_bytes);
      std::memset(dst + kgs * NR * 4, 0, panel_bytes - kgs * NR * 4);
    }
  };
  parallel_for((panels + pack_per_task - 1) / pack_per_task, pack);
  return wp;
}

// Phase 2's tasks: (block of rows) x (group of panels).  A block of rows (~256 KB of x, a
// multiple of `row_multiple` rows) stays in L2 while the panels stream through it; N is split
// into groups when there are too few row blocks to keep every thread busy.
struct TaskGrid {
  int64_t mc, mblocks, ngroups, panels_per_group;

  TaskGrid(int64_t M, int64_t row_bytes, int64_t row_multiple, int64_t panels,
           int64_t num_threads) {
    mc = std::max<int64_t>(row_multiple, (256 * 1024 / std::max<int64_t>(row_bytes, 1)) /
                                             row_multiple * row_multiple);
    mc = std::min<int64_t>(mc, kMaxRowBlock / row_multiple * row_multiple);
    mblocks = (M + mc - 1) / mc;
    const int64_t threads = std::max<int64_t>(1, num_threads);
    ngroups = 1;
    while (mblocks * ngroups < 4 * threads && ngroups * 2 <= panels) ngroups *= 2;
    panels_per_group = (panels + ngroups - 1) / ngroups;
    ngroups = (panels + panels_per_group - 1) / panels_per_group;
  }
  int64_t tasks() const { return mblocks * ngroups; }

  // Task t's rows [m0, m1) and panels [p0, p1); `first`: the one task of its row block that
  // may write per-row outputs.
  struct Task {
    int64_t m0, m1, p0, p1;
    bool first;
  };
  Task At(int64_t t, int64_t M, int64_t panels) const {
    const int64_t mb = t / ngroups, ng = t % ngroups;
    return {mb * mc, std::min(M, (mb + 1) * mc), ng * panels_per_group,
            std::min(panels, (ng + 1) * panels_per_group), ng == 0};
  }
};

// Rows of the matmul's left operand for one task: `rows(m0, m1, first, corr, rs)` returns
// int8 rows m0..m1 (stride K), fills corr[] with -128 * rowsum (unless corr is null: the AMX
// path needs no row sums) and, for the bf16 epilogue,
// rs[] with the row scales.  `first` is true for exactly one task per row block (the one that
// may write per-row outputs).
template <typename OutT, typename PF, typename Rows>
void PackedMatmul(PF&& parallel_for, int64_t num_threads, Rows&& rows, const int8_t* w,
                  OutT* out, const float* cs, int64_t M, int64_t N, int64_t K) {
  const int64_t kgs = (K + 3) / 4;
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t panel_bytes = kgs * NR * 4;
  static thread_local Scratch scratch;
  const uint8_t* wp = PackPanels(parallel_for, w, N, K, kgs, 0x80808080u, scratch);
  const TaskGrid grid(M, K, MR, panels, num_threads);

  const std::function<void(int64_t)> compute = [&](int64_t t) {
    const auto [m0, m1, p0, p1, first] = grid.At(t, M, panels);
    int32_t corr[kMaxRowBlock];
    float rs[kMaxRowBlock];
    const int8_t* x = rows(m0, m1, first, corr, rs);
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* panel = wp + p * panel_bytes;
      const int ncols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
      OutT* o = out + p * NR;
      const float* c = cs ? cs + p * NR : nullptr;
      int64_t m = m0;
      for (; m + MR <= m1; m += MR) {
        MicroKernel<MR>(x + (m - m0) * K, K, panel, corr + (m - m0), o + m * N, N, ncols,
                        rs + (m - m0), c);
      }
      const int8_t* xm = x + (m - m0) * K;
      const int32_t* cm = corr + (m - m0);
      const float* rm = rs + (m - m0);
      switch (m1 - m) {
        case 5: MicroKernel<5>(xm, K, panel, cm, o + m * N, N, ncols, rm, c); break;
        case 4: MicroKernel<4>(xm, K, panel, cm, o + m * N, N, ncols, rm, c); break;
        case 3: MicroKernel<3>(xm, K, panel, cm, o + m * N, N, ncols, rm, c); break;
        case 2: MicroKernel<2>(xm, K, panel, cm, o + m * N, N, ncols, rm, c); break;
        case 1: MicroKernel<1>(xm, K, panel, cm, o + m * N, N, ncols, rm, c); break;
        default: break;
      }
    }
  };
  static_assert(MR <= 6, "tail switch covers MR <= 6");
  parallel_for(grid.tasks(), compute);
}

// ----------------------------------------------------------------------------------------
// Packed path on AMX tiles (Intel Sapphire Rapids and later).  TDPBSSD multiplies SIGNED bytes
// by SIGNED bytes, 16 rows x 64 k of x (tile A) by 16 k-groups x 16 columns x 4 k of w (tile B:
// the packed panels' layout, with signed bytes) into 16 x 16 int32 sums, eight times the
// multiply-adds per cycle of vpdpbusd.  Each task configures its thread's tiles (XLA's own AMX
// kernels configure theirs before each use), copies its block of x's rows into a staging block
// padded with zeros to 16 rows and 64 k, and runs 16 x 64 output tiles over the panels (also
// zero-padded to 64 k), with the same epilogues as the VNNI micro-kernels: the same int32 sums,
// and the same float32 arithmetic after them, so the results are bit for bit those of the VNNI
// path and of XLA's dot.  BITNET_JAX_CPU_AMX=0 keeps the VNNI path.
// ----------------------------------------------------------------------------------------

// rows x ncols of a 16 x NR tile of sums to out: int32 as they are, or bf16 with the scales
// applied exactly as MicroKernel applies them.
template <typename OutT>
void AmxEpilogue(const int32_t* acc, int rows, int ncols, OutT* out, int64_t ldo,
                 const float* rs, const float* cs) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < NR; j += 16) {
      const __mmask16 m = TailMask16(ncols - j);
      if (!m) break;
      const __m512i v = _mm512_load_si512(acc + i * NR + j);
      if constexpr (std::is_same_v<OutT, uint16_t>) {
        const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(rs[i])),
                                       _mm512_maskz_loadu_ps(m, cs + j));
        _mm256_mask_storeu_epi16(out + i * ldo + j, m, ToBf16x16(f));
      } else {
        _mm512_mask_storeu_epi32(out + i * ldo + j, m, v);
      }
    }
  }
}

// PackedMatmul's contract (the same `rows` callback, asked for no row sums).
template <typename OutT, typename PF, typename Rows>
void AmxPackedMatmul(PF&& parallel_for, int64_t num_threads, Rows&& rows, const int8_t* w,
                     OutT* out, const float* cs, int64_t M, int64_t N, int64_t K) {
  static_assert(NR == 64, "bitnet_amx::PanelSums runs four 16-column tiles per panel");
  const int64_t kp = (K + 63) / 64 * 64;
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t panel_bytes = kp / 4 * NR * 4;
  static thread_local Scratch scratch;
  const uint8_t* wp = PackPanels(parallel_for, w, N, K, kp / 4, 0u, scratch);
  const TaskGrid grid(M, kp, 16, panels, num_threads);

  const std::function<void(int64_t)> compute = [&](int64_t t) {
    const auto [m0, m1, p0, p1, first] = grid.At(t, M, panels);
    float rs[kMaxRowBlock];
    const int8_t* x = rows(m0, m1, first, nullptr, rs);
    const int64_t nrows = m1 - m0, padded = (nrows + 15) / 16 * 16;
    static thread_local Scratch staging, sums;
    int8_t* xs = static_cast<int8_t*>(staging.get(padded * kp));
    for (int64_t i = 0; i < nrows; ++i) {
      std::memcpy(xs + i * kp, x + i * K, K);
      std::memset(xs + i * kp + K, 0, kp - K);
    }
    std::memset(xs + nrows * kp, 0, (padded - nrows) * kp);
    int32_t* acc = static_cast<int32_t*>(sums.get(16 * NR * sizeof(int32_t)));
    bitnet_amx::Configure();
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* panel = wp + p * panel_bytes;
      const int ncols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
      for (int64_t r = 0; r < nrows; r += 16) {
        bitnet_amx::PanelSums<bitnet_amx::PanelProduct::kInt8>(xs + r * kp, kp, panel,
                                                               kp / 64, acc);
        AmxEpilogue(acc, static_cast<int>(std::min<int64_t>(16, nrows - r)), ncols,
                    out + (m0 + r) * N + p * NR, N, rs + r, cs ? cs + p * NR : nullptr);
      }
    }
    bitnet_amx::Release();
  };
  parallel_for(grid.tasks(), compute);
}

// The packed product on AMX tiles where this process has them, else on VNNI: same results.
template <typename OutT, typename PF, typename Rows>
void PackedProduct(PF&& parallel_for, int64_t num_threads, Rows&& rows, const int8_t* w,
                   OutT* out, const float* cs, int64_t M, int64_t N, int64_t K) {
  if (bitnet_amx::Usable()) {
    AmxPackedMatmul<OutT>(parallel_for, num_threads, rows, w, out, cs, M, N, K);
  } else {
    PackedMatmul<OutT>(parallel_for, num_threads, rows, w, out, cs, M, N, K);
  }
}

// ----------------------------------------------------------------------------------------
// Direct path (small M): weights read in place, x shifted to unsigned.
// ----------------------------------------------------------------------------------------

// One 64-byte step along k of DirectTile. MASKED loads only the first K - k bytes of each w
// row (the tail); the full steps keep the mask out of the hot loop.
template <int ROWS, int NC, bool MASKED>
__attribute__((always_inline)) inline void DirectStep(
    const uint8_t* __restrict xu, int64_t ldx, const int8_t* __restrict w, int64_t K,
    int64_t k, __m512i (&acc)[ROWS][NC], __m512i (&ws)[NC]) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i wv[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    if constexpr (MASKED) {
      wv[j] = _mm512_maskz_loadu_epi8((~0ull) >> (64 - (K - k)), w + j * K + k);
    } else {
      wv[j] = _mm512_loadu_si512(w + j * K + k);
    }
    ws[j] = Dpbusd(ws[j], ones, wv[j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
    __m512i xv = _mm512_load_si512(xu + i * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[i][j] = Dpbusd(acc[i][j], xv, wv[j]);
  }
}

// Tile of ROWS rows of (shifted, padded) x times NC rows of w.
template <int ROWS, int NC>
__attribute__((always_inline)) inline void DirectTile(
    const uint8_t* __restrict xu, int64_t ldx, const int8_t* __restrict w, int64_t K,
    int32_t* __restrict out, int64_t ldo) {
  __m512i acc[ROWS][NC];
  __m512i ws[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    ws[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) DirectStep<ROWS, NC, false>(xu, ldx, w, K, k, acc, ws);
  if (k < K) DirectStep<ROWS, NC, true>(xu, ldx, w, K, k, acc, ws);
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    uint32_t c = 128u * static_cast<uint32_t>(_mm512_reduce_add_epi32(ws[j]));
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      uint32_t s = static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j]));
      out[i * ldo + j] = static_cast<int32_t>(s - c);
    }
  }
}

template <int NC>
void DirectRows(const uint8_t* xu, int64_t ldx, int64_t rows, const int8_t* w, int64_t K,
                int32_t* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) DirectTile<4, NC>(xu + i * ldx, ldx, w, K, out + i * ldo, ldo);
  switch (rows - i) {
    case 3: DirectTile<3, NC>(xu + i * ldx, ldx, w, K, out + i * ldo, ldo); break;
    case 2: DirectTile<2, NC>(xu + i * ldx, ldx, w, K, out + i * ldo, ldo); break;
    case 1: DirectTile<1, NC>(xu + i * ldx, ldx, w, K, out + i * ldo, ldo); break;
    default: break;
  }
}

template <typename PF>
void DirectMatmul(PF&& parallel_for, const int8_t* x, const int8_t* w, int32_t* out,
                  int64_t M, int64_t N, int64_t K) {
  const int64_t ldx = (K + 63) / 64 * 64;
  static thread_local Scratch scratch;
  uint8_t* xu = static_cast<uint8_t*>(scratch.get(M * ldx));
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* d = xu + m * ldx;
    const int8_t* s = x + m * K;
    for (int64_t k = 0; k < K; ++k) d[k] = static_cast<uint8_t>(s[k]) ^ 0x80u;
    std::memset(d + K, 0, ldx - K);
  }
  constexpr int NC = 4;
  const int64_t chunk = 64;  // rows of w per task
  const int64_t tasks = (N + chunk - 1) / chunk;
  const std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t n0 = t * chunk, n1 = std::min(N, n0 + chunk);
    int64_t n = n0;
    for (; n + NC <= n1; n += NC) DirectRows<NC>(xu, ldx, M, w + n * K, K, out + n, N);
    for (; n < n1; ++n) DirectRows<1>(xu, ldx, M, w + n * K, K, out + n, N);
  };
  parallel_for(tasks, fn);
}

ffi::Error Int8DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                       ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument("bitnet_int8_dot: expects x (M, K), w (N, K), out (M, N)");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (wd[1] != K || od[0] != M || od[1] != N) {
    return ffi::Error::InvalidArgument("bitnet_int8_dot: shape mismatch");
  }
  int32_t* o = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(o, 0, sizeof(int32_t) * M * N);
    return ffi::Error::Success();
  }
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  auto parallel_for = [&pool](int64_t n, const std::function<void(int64_t)>& fn) {
    ParallelFor(pool, n, fn);
  };
  if (UseDirectPath(M, N, K)) {
    DirectMatmul(parallel_for, xp, wp, o, M, N, K);
  } else {
    auto rows = [&](int64_t m0, int64_t m1, bool, int32_t* corr, float*) {
      if (corr) RowCorrections(xp + m0 * K, K, m1 - m0, corr);
      return xp + m0 * K;
    };
    PackedProduct<int32_t>(parallel_for, pool.num_threads(), rows, wp, o,
                           static_cast<const float*>(nullptr), M, N, K);
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------------------
// Backward helper: out[k, m] = bf16(codes[m, k] * scale[m]), the transposed dequantized
// activations that the weight gradient X^T G multiplies. XLA fuses this into a transposing
// loop that re-derives the codes from x and runs about 4x slower than this gather version.
// ----------------------------------------------------------------------------------------

// Rows m0..m0+rows (rows <= 16) of the output's columns: one gather fetches 4 consecutive
// codes of 16 rows; each byte becomes one 16-row run of an output row k.
void DequantizeTransposeRows(const int8_t* codes, const float* scale, uint16_t* out,
                             int64_t M, int64_t K, int64_t m0, int64_t rows) {
  const __mmask16 mask = rows >= 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  const __m512i index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(K)));
  const __m512 s = _mm512_maskz_loadu_ps(mask, scale + m0);
  const int8_t* base = codes + m0 * K;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const __m512i quad = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, index,
                                                     base + k, 1);
    for (int j = 0; j < 4; ++j) {  // byte j of each lane, sign-extended
      const __m512i c = _mm512_srai_epi32(_mm512_slli_epi32(quad, 24 - 8 * j), 24);
      const __m256i h = ToBf16x16(_mm512_mul_ps(_mm512_cvtepi32_ps(c), s));
      _mm256_mask_storeu_epi16(out + (k + j) * M + m0, mask, h);
    }
  }
  for (; k < K; ++k) {
    for (int64_t i = 0; i < rows; ++i) {
      out[k * M + m0 + i] = ToBf16(static_cast<float>(base[i * K + k]) * scale[m0 + i]);
    }
  }
}

ffi::Error DequantizeTransposeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> codes,
                                   ffi::Buffer<ffi::F32> scale,
                                   ffi::ResultBuffer<ffi::BF16> out) {
  auto cd = codes.dimensions();
  auto sd = scale.dimensions();
  auto od = out->dimensions();
  if (cd.size() != 2 || sd.size() != 1 || od.size() != 2 || sd[0] != cd[0] ||
      od[0] != cd[1] || od[1] != cd[0]) {
    return ffi::Error::InvalidArgument(
        "bitnet_dequantize_transpose: expects codes (M, K), scale (M,), out (K, M)");
  }
  const int64_t M = cd[0], K = cd[1];
  if (M == 0 || K == 0) return ffi::Error::Success();
  const int8_t* c = codes.typed_data();
  const float* s = scale.typed_data();
  uint16_t* o = reinterpret_cast<uint16_t*>(out->typed_data());
  // A task is 64 rows of codes: 64-value runs of every output row, and enough tasks to
  // share between threads.
  constexpr int64_t kRowsPerTask = 64;
  const std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t end = std::min(M, (t + 1) * kRowsPerTask);
    for (int64_t m0 = t * kRowsPerTask; m0 < end; m0 += 16) {
      DequantizeTransposeRows(c, s, o, M, K, m0, std::min<int64_t>(16, end - m0));
    }
  };
  ParallelFor(pool, (M + kRowsPerTask - 1) / kRowsPerTask, fn);
  return ffi::Error::Success();
}


// ----------------------------------------------------------------------------------------
// Activation quantization fused into the product: bf16 rows are quantized per token into a
// task-local int8 block (in L2) just before the micro-kernels read them, so no int8 copy of
// the activations goes through memory, and the output is written in bfloat16 with both
// scales applied.  Codes are clip(round_half_even(x * mult), lo, hi) as in quant.py; for
// absmax rows mult = (1 / max(max|x|, 1e-5)) * q and scale = max(max|x|, 1e-5) * (1 / q), computed
// here (a max does not depend on the reduction order, so this equals XLA's; `floor` is the
// 1e-5 of activations, or 0 for gradients, whose small rows must not be flushed: an all-zero
// row then takes max|x| = 1, so its codes stay 0); other
// quantizers (absmean: a mean, whose rounding does depend on the order) pass mult and scale
// in.  Activations are assumed finite.
// ----------------------------------------------------------------------------------------

inline float Code(float f, float mult, float lo, float hi) {
  // Through int32 so that -0.0 becomes 0, as the int8 codes of the unfused path do.
  return static_cast<float>(
      static_cast<int32_t>(std::min(std::max(std::nearbyint(f * mult), lo), hi)));
}

float RowAbsmax(const uint16_t* x, int64_t K) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    m = _mm512_max_ps(m, _mm512_abs_ps(Bf16ToF32x16(x + k, TailMask16(K - k))));
  }
  return _mm512_reduce_max_ps(m);
}

// Writes the int8 codes of one row to dst and returns their sum.
int32_t QuantizeRow(const uint16_t* x, int64_t K, float mult, float lo, float hi, int8_t* dst) {
  const __m512 vm = _mm512_set1_ps(mult), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = TailMask16(K - k);
    const __m512i c = Codes16(Bf16ToF32x16(x + k, m), vm, vlo, vhi);
    sum = _mm512_mask_add_epi32(sum, m, sum, c);
    _mm512_mask_cvtepi32_storeu_epi8(dst + k, m, c);
  }
  return _mm512_reduce_add_epi32(sum);
}

struct RowQuantizer {
  const uint16_t* x;
  int64_t K;
  float lo, hi;
  int32_t q_max;          // > 0: absmax rows, mult and scale computed here and written out
  float floor;            // absmax rows: max|x| is raised to at least this (0: zero rows -> 1)
  const float* mult_in;   // otherwise: given per row
  const float* scale_in;
  float* mult_out;
  float* scale_out;

  void Params(int64_t m, float* mult, float* scale) const {
    if (q_max > 0) {
      float a = std::max(RowAbsmax(x + m * K, K), floor);
      if (a == 0.0f) a = 1.0f;
      *mult = (1.0f / a) * static_cast<float>(q_max);
      // XLA's simplifier turns quant.py's `absmax / q` into `absmax * (1 / q)`.
      *scale = a * (1.0f / static_cast<float>(q_max));
    } else {
      *mult = mult_in[m];
      *scale = scale_in[m];
    }
  }

  // Codes of rows m0..m1 into dst, -128 * rowsum into corr (unless null), scales into rs.
  void Rows(int64_t m0, int64_t m1, bool write_params, int8_t* dst, int32_t* corr,
            float* rs) const {
    for (int64_t m = m0; m < m1; ++m) {
      float mult, scale;
      Params(m, &mult, &scale);
      const int32_t sum = QuantizeRow(x + m * K, K, mult, lo, hi, dst + (m - m0) * K);
      if (corr) corr[m - m0] = static_cast<int32_t>(-128u * static_cast<uint32_t>(sum));
      rs[m - m0] = scale;
      if (write_params && q_max > 0) {
        mult_out[m] = mult;
        scale_out[m] = scale;
      }
    }
  }
};

// y = bf16((float(acc) * rs[m]) * cs[n]) for an (M, N) int32 product, as the packed epilogue.
void ScaleToBf16(const int32_t* acc, const float* rs, const float* cs, uint16_t* y, int64_t M,
                 int64_t N) {
  for (int64_t m = 0; m < M; ++m) {
    const __m512 r = _mm512_set1_ps(rs[m]);
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mk = TailMask16(N - n);
      const __m512 a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mk, acc + m * N + n));
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(a, r), _mm512_maskz_loadu_ps(mk, cs + n));
      _mm256_mask_storeu_epi16(y + m * N + n, mk, ToBf16x16(v));
    }
  }
}

void QuantDot(ffi::ThreadPool& pool, const RowQuantizer& rq, const int8_t* w, const float* cs,
              uint16_t* y, int64_t M, int64_t N, int64_t K) {
  if (M == 0) return;
  auto parallel_for = [&pool](int64_t n, const std::function<void(int64_t)>& fn) {
    ParallelFor(pool, n, fn);
  };
  if (N != 0 && K != 0 && !UseDirectPath(M, N, K)) {
    auto rows = [&](int64_t m0, int64_t m1, bool first, int32_t* corr, float* rs) {
      static thread_local Scratch block;
      int8_t* d = static_cast<int8_t*>(block.get((m1 - m0) * K + 64));
      rq.Rows(m0, m1, first, d, corr, rs);
      return static_cast<const int8_t*>(d);
    };
    PackedProduct<uint16_t>(parallel_for, pool.num_threads(), rows, w, y, cs, M, N, K);
    return;
  }
  // Few rows (decode): quantize them all, the direct int32 product, then the epilogue.
  static thread_local Scratch codes_buf, acc_buf;
  int8_t* q = static_cast<int8_t*>(codes_buf.get(M * K + 64));
  int32_t* acc = static_cast<int32_t*>(acc_buf.get(M * N * sizeof(int32_t) + 64));
  std::vector<float> rs(M);
  rq.Rows(0, M, true, q, nullptr, rs.data());  // the direct path makes its own row sums
  if (N == 0) return;
  if (K == 0) {
    std::memset(acc, 0, sizeof(int32_t) * M * N);
  } else {
    DirectMatmul(parallel_for, q, w, acc, M, N, K);
  }
  ScaleToBf16(acc, rs.data(), cs, y, M, N);
}

ffi::Error CheckQuantDot(const char* name, ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::S8>& w,
                         ffi::Buffer<ffi::F32>& ws, ffi::ResultBuffer<ffi::BF16>& y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto sd = ws.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 1 || yd.size() != 2 || wd[1] != xd[1] ||
      sd[0] != wd[0] || yd[0] != xd[0] || yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument(std::string(name) +
        ": expects x (M, K) bf16, w (N, K) int8, w_scale (N,), out (M, N) bf16");
  }
  return ffi::Error::Success();
}

ffi::Error AbsmaxQuantDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                              ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> ws, int32_t q_max,
                              float floor, ffi::ResultBuffer<ffi::BF16> y,
                              ffi::ResultBuffer<ffi::F32> mult,
                              ffi::ResultBuffer<ffi::F32> scale) {
  ffi::Error err = CheckQuantDot("bitnet_absmax_quant_dot", x, w, ws, y);
  if (err.failure()) return err;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[0];
  if (mult->dimensions().size() != 1 || mult->dimensions()[0] != M ||
      scale->dimensions().size() != 1 || scale->dimensions()[0] != M || q_max <= 0 ||
      !(floor >= 0.0f)) {
    return ffi::Error::InvalidArgument(
        "bitnet_absmax_quant_dot: expects mult (M,), scale (M,), q_max > 0 and floor >= 0");
  }
  RowQuantizer rq{reinterpret_cast<const uint16_t*>(x.typed_data()), K,
                  static_cast<float>(-q_max - 1), static_cast<float>(q_max), q_max, floor,
                  nullptr, nullptr, mult->typed_data(), scale->typed_data()};
  QuantDot(pool, rq, w.typed_data(), ws.typed_data(),
           reinterpret_cast<uint16_t*>(y->typed_data()), M, N, K);
  return ffi::Error::Success();
}

// The same per-token absmax quantization without the product: int8 codes (M, K) and the rows'
// mult and scale, in one pass, for the products XLA takes itself (AMX CPUs), so that the
// quantization is one operation of the step instead of XLA's row maximum and codes fusion.
ffi::Error AbsmaxQuantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, int32_t q_max,
                              float floor, ffi::ResultBuffer<ffi::S8> codes,
                              ffi::ResultBuffer<ffi::F32> mult,
                              ffi::ResultBuffer<ffi::F32> scale) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || codes->dimensions().size() != 2 || codes->dimensions()[0] != xd[0] ||
      codes->dimensions()[1] != xd[1] || mult->dimensions().size() != 1 ||
      mult->dimensions()[0] != xd[0] || scale->dimensions().size() != 1 ||
      scale->dimensions()[0] != xd[0] || q_max <= 0 || !(floor >= 0.0f)) {
    return ffi::Error::InvalidArgument(
        "bitnet_absmax_quantize: expects x (M, K), codes (M, K), mult (M,), scale (M,), "
        "q_max > 0 and floor >= 0");
  }
  const int64_t M = xd[0], K = xd[1];
  RowQuantizer rq{reinterpret_cast<const uint16_t*>(x.typed_data()), K,
                  static_cast<float>(-q_max - 1), static_cast<float>(q_max), q_max, floor,
                  nullptr, nullptr, mult->typed_data(), scale->typed_data()};
  int8_t* out = codes->typed_data();
  constexpr int64_t kRowsPerTask = 64;
  const std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t m0 = t * kRowsPerTask, m1 = std::min(M, m0 + kRowsPerTask);
    float rs[kRowsPerTask];  // the product's row scales: unused here
    rq.Rows(m0, m1, true, out + m0 * K, nullptr, rs);
  };
  ParallelFor(pool, (M + kRowsPerTask - 1) / kRowsPerTask, fn);
  return ffi::Error::Success();
}

ffi::Error ScaledQuantDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                              ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> ws,
                              ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> scale,
                              int32_t lo, int32_t hi, ffi::ResultBuffer<ffi::BF16> y) {
  ffi::Error err = CheckQuantDot("bitnet_scaled_quant_dot", x, w, ws, y);
  if (err.failure()) return err;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[0];
  if (mult.dimensions().size() != 1 || mult.dimensions()[0] != M ||
      scale.dimensions().size() != 1 || scale.dimensions()[0] != M || lo < -128 || hi > 127 ||
      lo > 0 || hi < 0) {
    return ffi::Error::InvalidArgument(
        "bitnet_scaled_quant_dot: expects mult (M,), scale (M,) and -128 <= lo <= 0 <= hi <= 127");
  }
  RowQuantizer rq{reinterpret_cast<const uint16_t*>(x.typed_data()), K, static_cast<float>(lo),
                  static_cast<float>(hi), 0, 0.0f, mult.typed_data(), scale.typed_data(), nullptr,
                  nullptr};
  QuantDot(pool, rq, w.typed_data(), ws.typed_data(),
           reinterpret_cast<uint16_t*>(y->typed_data()), M, N, K);
  return ffi::Error::Success();
}

// The product of codes quantized beforehand (x's int8 codes with one scale per row) with the
// bf16 epilogue: y = bf16((x @ w.T) * x_scale * w_scale), one call where XLA would take an int8
// dot and a pass dequantizing its int32 sums.  For inputs that several linears share (q, k and
// v; gate and up), quantized once and multiplied by each, and their backward's X_q^T written
// once; on AMX tiles where the CPU has them.
ffi::Error Int8ScaledDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                             ffi::Buffer<ffi::F32> x_scale, ffi::Buffer<ffi::S8> w,
                             ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::BF16> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || wd[1] != xd[1] ||
      x_scale.dimensions().size() != 1 || x_scale.dimensions()[0] != xd[0] ||
      w_scale.dimensions().size() != 1 || w_scale.dimensions()[0] != wd[0] ||
      yd[0] != xd[0] || yd[1] != wd[0]) {
    return ffi::Error::InvalidArgument(
        "bitnet_int8_scaled_dot: expects x (M, K) int8, x_scale (M,), w (N, K) int8, "
        "w_scale (N,), out (M, N) bf16");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int8_t* xp = x.typed_data();
  const float* xs = x_scale.typed_data();
  const float* cs = w_scale.typed_data();
  uint16_t* out = reinterpret_cast<uint16_t*>(y->typed_data());
  auto parallel_for = [&pool](int64_t n, const std::function<void(int64_t)>& fn) {
    ParallelFor(pool, n, fn);
  };
  if (K != 0 && !UseDirectPath(M, N, K)) {
    auto rows = [&](int64_t m0, int64_t m1, bool, int32_t* corr, float* rs) {
      if (corr) RowCorrections(xp + m0 * K, K, m1 - m0, corr);
      std::copy(xs + m0, xs + m1, rs);
      return xp + m0 * K;
    };
    PackedProduct<uint16_t>(parallel_for, pool.num_threads(), rows, w.typed_data(), out, cs, M,
                            N, K);
    return ffi::Error::Success();
  }
  static thread_local Scratch acc_buf;
  int32_t* acc = static_cast<int32_t*>(acc_buf.get(M * N * sizeof(int32_t) + 64));
  if (K == 0) {
    std::memset(acc, 0, sizeof(int32_t) * M * N);
  } else {
    DirectMatmul(parallel_for, xp, w.typed_data(), acc, M, N, K);
  }
  ScaleToBf16(acc, xs, cs, out, M, N);
  return ffi::Error::Success();
}

// Backward of the fused product: out[k, m] = bf16(code(x[m, k]) * scale[m]), X_q^T for the
// weight gradient, re-derived from the bf16 activations in one pass (one gather fetches 2
// values from each of 16 rows).
void QuantizeTransposeRows(const uint16_t* x, const float* mult, const float* scale, float lo,
                           float hi, uint16_t* out, int64_t M, int64_t K, int64_t m0,
                           int64_t rows) {
  const __mmask16 mask = TailMask16(rows);
  const __m512i index = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(2 * K)));
  const __m512 s = _mm512_maskz_loadu_ps(mask, scale + m0);
  const __m512 mu = _mm512_maskz_loadu_ps(mask, mult + m0);
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const uint16_t* base = x + m0 * K;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, index,
                                                     base + k, 1);
    const __m512 f0 = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
    const __m512 f1 = _mm512_castsi512_ps(_mm512_and_si512(pair, high));
    const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(Codes16(f0, mu, vlo, vhi)), s);
    const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(Codes16(f1, mu, vlo, vhi)), s);
    _mm256_mask_storeu_epi16(out + k * M + m0, mask, ToBf16x16(v0));
    _mm256_mask_storeu_epi16(out + (k + 1) * M + m0, mask, ToBf16x16(v1));
  }
  for (; k < K; ++k) {
    for (int64_t i = 0; i < rows; ++i) {
      const float c = Code(Bf16ToF32(base[i * K + k]), mult[m0 + i], lo, hi);
      out[k * M + m0 + i] = ToBf16(c * scale[m0 + i]);
    }
  }
}

ffi::Error QuantizeTransposeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                 ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> scale,
                                 int32_t lo, int32_t hi, ffi::ResultBuffer<ffi::BF16> out) {
  auto xd = x.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || od.size() != 2 || od[0] != xd[1] || od[1] != xd[0] ||
      mult.dimensions().size() != 1 || mult.dimensions()[0] != xd[0] ||
      scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "bitnet_quantize_transpose: expects x (M, K), mult (M,), scale (M,), out (K, M)");
  }
  const int64_t M = xd[0], K = xd[1];
  if (M == 0 || K == 0) return ffi::Error::Success();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  uint16_t* o = reinterpret_cast<uint16_t*>(out->typed_data());
  constexpr int64_t kRowsPerTask = 64;
  const std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t end = std::min(M, (t + 1) * kRowsPerTask);
    for (int64_t m0 = t * kRowsPerTask; m0 < end; m0 += 16) {
      QuantizeTransposeRows(xp, mult.typed_data(), scale.typed_data(), static_cast<float>(lo),
                            static_cast<float>(hi), o, M, K, m0, std::min<int64_t>(16, end - m0));
    }
  };
  ParallelFor(pool, (M + kRowsPerTask - 1) / kRowsPerTask, fn);
  return ffi::Error::Success();
}

}  // namespace

// Whether the packed products run on AMX tiles now (`cpu_int8.kernel_uses_amx`, via ctypes).
extern "C" int BitnetAmxTiles() { return bitnet_amx::Usable() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetDequantizeTranspose, DequantizeTransposeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetInt8Dot, Int8DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetAbsmaxQuantDot, AbsmaxQuantDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("q_max")
                                  .Attr<float>("floor")
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetAbsmaxQuantize, AbsmaxQuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("q_max")
                                  .Attr<float>("floor")
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetScaledQuantDot, ScaledQuantDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("lo")
                                  .Attr<int32_t>("hi")
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetQuantizeTranspose, QuantizeTransposeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("lo")
                                  .Attr<int32_t>("hi")
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetInt8ScaledDot, Int8ScaledDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
