// The weight gradient's product on AMX tiles or AVX512-BF16 vectors, as two XLA FFI custom
// calls:
//
//   out[p, n] = sum_m xt[p, m] * g[m, n]      xt: (P, M) bf16 (X^T, row-major), g: (M, N) bf16,
//                                             out: (P, N) float32         (weight_gradient_dot)
//   the same with xt[p, m] = bf16(code(x[m, p]) * scale[m]) built from x (M, P) and its rows'
//   mult and scale, the values `quantize_transpose` writes        (quantized_weight_gradient)
//
// TDPBF16PS multiplies a 16 x 32 bf16 tile of xt (16 rows of X^T, 32 consecutive m) by a tile
// of g holding 16 pairs of consecutive rows interleaved per column ([m / 2][16 columns][2], the
// "pair" layout the instruction reads) and adds the 16 x 16 float32 sums.  Each task owns a
// block of out, as large as a core's L2 holds (2 MB on Sapphire Rapids), which stays there
// while m runs by in chunks of kChunk rows: per chunk the task packs its columns of g into pair
// panels (read once per block of rows), and per 32 rows of out stages their xt chunk into L1
// (tile by tile, 1 KB each: xt's own rows lie 2 M bytes apart, 8 KB in training, and would
// fall into the same few L1 sets), then runs 32 x 32 blocks of out on four sum tiles, two of xt
// and two of g.  Without tiles (AMD Zen 4) the same chunks go through VDPBF16PS, 8 rows x 32
// columns of out in 16 sum vectors, and where m spans several of the blocks in which XLA sums
// it there, the tasks split m at those blocks rather than out's rows (`ProductAvx512`).
//
// XLA:CPU's own bf16 dot (YNNPACK) took 1.2-1.4x this kernel's time at the ladder presets'
// weight-gradient shapes on a 2-core Xeon, and `quantize_transpose` with it 1.4-1.9x the time
// of the quantized call, which never writes X_q^T (2026-12-05; scripts/bench_weight_gradient.py).
//
// Numbers: each bf16 x bf16 product is exact in float32, both instructions round as they add,
// and the sums run in m's order in one accumulator per output, as XLA's own product runs them
// on each kind of CPU (a pair's even product first on tiles, its odd one first on vectors, as
// `input_gradient.cc` says): the results equal XLA's dot bit for bit on the Xeon and on a 2-core
// AMD EPYC (tests/test_cpu_weight_gradient.py).  Both treat subnormal inputs as zero and flush
// subnormal sums.  Any shape: tails are staged with zeros.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>

#include "amx_tiles.h"
#include "ffi_parallel.h"
#include "kernel_util.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bitnet_ffi::ParallelFor;
using bitnet_kernels::Bf16ToF32x16;
using bitnet_kernels::Codes16;
using bitnet_kernels::RoundUp;
using bitnet_kernels::Scratch;
using bitnet_kernels::TailMask16;
using bitnet_kernels::ToBf16x16;
using bitnet_kernels::TransposeDwords16x16;
using bitnet_kernels::VectorSumBlock;

constexpr int64_t kBlock = 32;      // rows and columns of out per micro-step (2 x 2 tiles)
constexpr int64_t kChunk = 256;     // rows of m per pass over a task's block of out
constexpr int64_t kMaxTaskCols = 1536;  // columns of out per task
// A task's block of out and g chunk, in bytes: Sapphire Rapids' L2 (2 MB a core).  On AMD Zen 4
// (1 MB) half as much made the widest products slower (bench_weight_gradient, 2026-12-05: 512 x
// 4096 x 1376 at 1.11 against 0.92x XLA's time), the rest no faster.
constexpr int64_t kL2Budget = 1792 * 1024;

// 16 bf16 values of one row (a) and of the next (b) as 16 pairs: lane 2j takes a's j, lane
// 2j + 1 takes b's j (index 32 + j of the two sources).
__attribute__((always_inline)) inline __m512i InterleavePairs(__m256i a, __m256i b) {
  alignas(64) static const uint16_t kOrder[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5,
                                                   37, 6, 38, 7, 39, 8, 40, 9, 41, 10, 42,
                                                   11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), _mm512_load_si512(kOrder),
                                   _mm512_castsi256_si512(b));
}

// Rows [m0, m1) of g's columns [n0, n1) into `panels` of 16 columns, each [(m1 - m0) / 2][16][2]
// bf16 (`panel_elems` apart): pairs of consecutive rows interleaved per column, zeros past M and
// N.  Row pairs outermost, so that g is read as it lies in memory.
void PackPairs(const uint16_t* g, int64_t M, int64_t N, int64_t n0, int64_t n1, int64_t m0,
               int64_t m1, uint16_t* panels, int64_t panel_elems) {
  for (int64_t m = m0; m < m1; m += 2) {
    const uint16_t* r0 = g + m * N;
    const uint16_t* r1 = r0 + N;
    uint16_t* dst = panels + (m - m0) * 16;
    for (int64_t n = n0; n < n1; n += 16, dst += panel_elems) {
      const __mmask16 cols = TailMask16(N - n);
      const __m256i a = m < M ? _mm256_maskz_loadu_epi16(cols, r0 + n) : _mm256_setzero_si256();
      const __m256i b = m + 1 < M ? _mm256_maskz_loadu_epi16(cols, r1 + n)
                                  : _mm256_setzero_si256();
      _mm512_store_si512(dst, InterleavePairs(a, b));
    }
  }
}

// Where the rows of out take their operand from: rows [p0, p0 + 32) x m [m0, m1) of X^T (bf16)
// staged as two tiles' worth per 32 m, each tile's 16 rows of 64 bytes contiguous
// ([2][(m1 - m0) / 32][16][32]), zeros past P and M.  Tile loads then read 1 KB in a row,
// where X^T's own rows, 2 M bytes apart (8 KB in training), would fall into the same few L1
// sets.

// From X^T (P, M) itself.
struct TransposedRows {
  static constexpr int64_t kStageCost = 1;
  const uint16_t* xt;
  int64_t P, M;

  void Stage(int64_t p0, int64_t m0, int64_t m1, uint16_t* dst) const {
    const int64_t steps = (m1 - m0) / 32;
    for (int64_t i = 0; i < kBlock; ++i) {
      uint16_t* row = dst + (i / 16) * steps * 512 + (i % 16) * 32;
      const int64_t p = p0 + i;
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t m = m0 + s * 32;
        const __mmask16 lo = p < P ? TailMask16(M - m) : 0;
        const __mmask16 hi = p < P ? TailMask16(M - m - 16) : 0;
        _mm256_store_si256(reinterpret_cast<__m256i*>(row + s * 512),
                           _mm256_maskz_loadu_epi16(lo, xt + p * M + m));
        _mm256_store_si256(reinterpret_cast<__m256i*>(row + s * 512 + 16),
                           _mm256_maskz_loadu_epi16(hi, xt + p * M + m + 16));
      }
    }
  }
};

// From x (M, P) quantized per row: X_q^T[p, m] = bf16(code(x[m, p]) * scale[m]), the values
// `bitnet_quantize_transpose` writes (same operations, same bits), built in L1 instead of
// written to memory and read back.  Per 32 m and 16 p: 32 rows quantized, consecutive rows'
// values interleaved into 16 pairs (32-bit words), and a 16 x 16 transpose of the words.
struct QuantizedRows {
  static constexpr int64_t kStageCost = 3;
  const uint16_t* x;
  const float* mult;
  const float* scale;
  float lo, hi;
  int64_t P, M;

  __m256i Row(int64_t m, int64_t p, __mmask16 cols) const {
    if (m >= M) return _mm256_setzero_si256();
    const __m512i codes = Codes16(Bf16ToF32x16(x + m * P + p, cols), _mm512_set1_ps(mult[m]),
                                  _mm512_set1_ps(lo), _mm512_set1_ps(hi));
    return ToBf16x16(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(scale[m])));
  }

  void Stage(int64_t p0, int64_t m0, int64_t m1, uint16_t* dst) const {
    const int64_t steps = (m1 - m0) / 32;
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t p = p0 + 16 * h;
      const __mmask16 cols = TailMask16(P - p);
      for (int64_t s = 0; s < steps; ++s) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j) {
          const int64_t m = m0 + 32 * s + 2 * j;
          r[j] = InterleavePairs(Row(m, p, cols), Row(m + 1, p, cols));
        }
        TransposeDwords16x16(r);
        uint16_t* tile = dst + (h * steps + s) * 512;
        for (int i = 0; i < 16; ++i) _mm512_store_si512(tile + i * 32, r[i]);
      }
    }
  }
};

// out's block [p0, p1) x [n0, n1) (multiples of 32; stride ldc, rows padded to a multiple of
// 32) over all of m: per chunk of m, g's chunk packed once into the task's L2, then per 32
// rows of out their xt chunk staged into L1 and the 32 x 32 blocks of the columns summed.
// The block of out stays in L2 across the chunks.
template <typename Rows>
__attribute__((target("amx-tile,amx-bf16"))) void BlockProduct(
    const Rows& rows, const uint16_t* g, int64_t M, int64_t N, float* out, int64_t ldc,
    int64_t p0, int64_t p1, int64_t n0, int64_t n1, uint16_t* b_chunk, uint16_t* a_chunk) {
  const int64_t mp = RoundUp(M, 32), c_stride = ldc * 4;
  for (int64_t k0 = 0; k0 < mp; k0 += kChunk) {
    const int64_t k1 = std::min(mp, k0 + kChunk), kc = k1 - k0, panel_elems = kc * 16;
    PackPairs(g, M, N, n0, n1, k0, k1, b_chunk, panel_elems);
    for (int64_t p = p0; p < p1; p += kBlock) {
      rows.Stage(p, k0, k1, a_chunk);
      const uint16_t* a0 = a_chunk;
      const uint16_t* a1 = a_chunk + (kc / 32) * 512;
      for (int64_t n = n0; n < n1; n += kBlock) {
        const uint16_t* b0 = b_chunk + (n - n0) / 16 * panel_elems;
        const uint16_t* b1 = b0 + panel_elems;
        float* c = out + p * ldc + n;
        if (k0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, c_stride);
          _tile_loadd(1, c + 16, c_stride);
          _tile_loadd(2, c + 16 * ldc, c_stride);
          _tile_loadd(3, c + 16 * ldc + 16, c_stride);
        }
        for (int64_t s = 0; s < kc / 32; ++s) {
          _tile_loadd(4, a0 + s * 512, 64);
          _tile_loadd(5, a1 + s * 512, 64);
          _tile_loadd(6, b0 + s * 512, 64);
          _tile_loadd(7, b1 + s * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c, c_stride);
        _tile_stored(1, c + 16, c_stride);
        _tile_stored(2, c + 16 * ldc, c_stride);
        _tile_stored(3, c + 16 * ldc + 16, c_stride);
      }
    }
  }
}

// Pair q of a chunk for kRows rows x 32 columns of out: acc[r] += row r's pair q of the staged
// xt (`a`: rows 64 bytes apart, 16 pairs per 512-element step) times the pair q of the two
// 16-column panels of g (`b0`, `b1`).
template <int kRows>
__attribute__((target(BITNET_AVX512_BF16_TARGET), always_inline)) inline void PairsStep(
    __m512 (&acc)[kRows][2], const uint16_t* a, const uint16_t* b0, const uint16_t* b1,
    int64_t q) {
  const __m512bh g0 = (__m512bh)_mm512_load_si512(b0 + q * 32);
  const __m512bh g1 = (__m512bh)_mm512_load_si512(b1 + q * 32);
  const uint16_t* aq = a + (q / 16) * 512 + (q % 16) * 2;
  for (int r = 0; r < kRows; ++r) {
    uint32_t pair;
    std::memcpy(&pair, aq + r * 32, sizeof(pair));
    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, g0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, g1);
  }
}

// The same block product on AVX512-BF16 vectors, for CPUs without AMX tiles: the same packed g
// chunk and staged xt chunk, and per 8 rows x 32 columns of out 16 sum vectors, each pair of
// xt's row broadcast to the 16 lanes of VDPBF16PS, over m's chunks [k_begin, k_end).  The sums
// follow XLA's on such CPUs (`VectorSumBlock`, a multiple of kChunk): m's even part in blocks,
// whose sums wait between chunks in out (the first block) or in `partial` (ld `ldp`, the shape
// of the block of out; the later ones) and are then added to out (or, `keep_block_sums`, left
// in `partial` for the caller to add), and an odd M's last row added last, as a pair of it and
// a zero row.
template <typename Rows>
__attribute__((target(BITNET_AVX512_BF16_TARGET))) void BlockProductAvx512(
    const Rows& rows, const uint16_t* g, int64_t M, int64_t N, float* out, int64_t ldc,
    int64_t p0, int64_t p1, int64_t n0, int64_t n1, uint16_t* b_chunk, uint16_t* a_chunk,
    float* partial, int64_t ldp, int64_t k_begin, int64_t k_end, bool keep_block_sums) {
  constexpr int kRows = 8;
  const int64_t even = M - M % 2, sum_block = VectorSumBlock(N);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    const int64_t k1 = std::min(k_end, k0 + kChunk), kc = k1 - k0, panel_elems = kc * 16;
    const int64_t steps = kc / 32;
    const int64_t pairs = std::max<int64_t>(0, std::min(k1, even) - k0) / 2;  // of rows < even
    const bool tail = M % 2 && M - 1 >= k0 && M - 1 < k1;  // the odd last row is here
    if (pairs == 0 && !tail) continue;
    const int64_t block = k0 / sum_block;
    const bool first = k0 % sum_block == 0;
    const bool last = k1 % sum_block == 0 || k0 + 2 * pairs == even;  // ends its block
    PackPairs(g, M, N, n0, n1, k0, k1, b_chunk, panel_elems);
    for (int64_t p = p0; p < p1; p += kBlock) {
      rows.Stage(p, k0, k1, a_chunk);
      for (int64_t i0 = 0; i0 < kBlock; i0 += kRows) {
        // Row i of the staged block: tile i / 16, row i % 16, 32 m (16 pairs) per step.
        const uint16_t* a = a_chunk + (i0 / 16) * steps * 512 + (i0 % 16) * 32;
        for (int64_t n = n0; n < n1; n += kBlock) {
          const uint16_t* b0 = b_chunk + (n - n0) / 16 * panel_elems;
          const uint16_t* b1 = b0 + panel_elems;
          float* c = out + (p + i0) * ldc + n;
          float* sums = block == 0 ? c : partial + (p - p0 + i0) * ldp + (n - n0);
          const int64_t lds = block == 0 ? ldc : ldp;
          __m512 acc[kRows][2];
          for (int r = 0; r < kRows; ++r) {
            const bool zero = pairs > 0 ? first : even == 0;  // else out holds the sums
            float* from = pairs > 0 ? sums + r * lds : c + r * ldc;
            acc[r][0] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(from);
            acc[r][1] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(from + 16);
          }
          for (int64_t q = 0; q < pairs; ++q) PairsStep<kRows>(acc, a, b0, b1, q);
          if (pairs > 0 && (!last || (keep_block_sums && block > 0))) {
            for (int r = 0; r < kRows; ++r) {
              _mm512_storeu_ps(sums + r * lds, acc[r][0]);
              _mm512_storeu_ps(sums + r * lds + 16, acc[r][1]);
            }
            continue;
          }
          if (pairs > 0 && block > 0) {  // out's sum of the earlier blocks, plus this one's
            for (int r = 0; r < kRows; ++r) {
              acc[r][0] = _mm512_add_ps(_mm512_loadu_ps(c + r * ldc), acc[r][0]);
              acc[r][1] = _mm512_add_ps(_mm512_loadu_ps(c + r * ldc + 16), acc[r][1]);
            }
          }
          if (tail) PairsStep<kRows>(acc, a, b0, b1, (M - 1 - k0) / 2);
          for (int r = 0; r < kRows; ++r) {
            _mm512_storeu_ps(c + r * ldc, acc[r][0]);
            _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
          }
        }
      }
    }
  }
}

// Blocks of out per task: as large as a core's L2 holds with their g chunk, split until every
// thread has a share (a multiple of the threads where that takes few more tasks).  Each block
// packs g's columns once per block of rows and stages its rows once per block of columns, so
// a split goes to the side whose repeats cost less: `stage_cost` is staging a row's element
// against packing one of g's (3 for quantized rows, measured on the Xeon; 1 for a copy).
struct BlockGrid {
  int64_t rows, cols, row_parts, col_parts;

  BlockGrid(int64_t pp, int64_t np, int64_t threads, int64_t stage_cost) {
    col_parts = (np + kMaxTaskCols - 1) / kMaxTaskCols;
    cols = RoundUp((np + col_parts - 1) / col_parts, kBlock);
    const int64_t max_rows = std::max<int64_t>(
        kBlock, (kL2Budget / cols - 2 * kChunk) / 4 / kBlock * kBlock);
    row_parts = (pp + max_rows - 1) / max_rows;
    while ((row_parts * col_parts) % threads != 0 && row_parts * col_parts < 8 * threads &&
           (pp > row_parts * kBlock || np > col_parts * kBlock)) {
      if (stage_cost * pp * col_parts >= np * row_parts && pp > row_parts * kBlock) {
        ++row_parts;
      } else {
        ++col_parts;
      }
    }
    rows = RoundUp((pp + row_parts - 1) / row_parts, kBlock);
    cols = RoundUp((np + col_parts - 1) / col_parts, kBlock);
    row_parts = (pp + rows - 1) / rows;
    col_parts = (np + cols - 1) / cols;
  }
  int64_t tasks() const { return row_parts * col_parts; }

  // Block b's rows [p0, p1) and columns [n0, n1) of out (pp x np), and the calling thread's
  // buffers for a chunk of g's panels and of staged rows.
  struct Task {
    int64_t p0, p1, n0, n1;
    uint16_t* b_chunk;
    uint16_t* a_chunk;
  };
  Task At(int64_t b, int64_t pp, int64_t np) const {
    static thread_local Scratch b_chunk, a_chunk;
    const int64_t p0 = b / col_parts * rows, n0 = b % col_parts * cols;
    return {p0, std::min(pp, p0 + rows), n0, std::min(np, n0 + cols),
            static_cast<uint16_t*>(b_chunk.get(kChunk * cols * sizeof(uint16_t))),
            static_cast<uint16_t*>(a_chunk.get(kBlock * kChunk * sizeof(uint16_t)))};
  }
};

// The vector product's tasks.  XLA sums m in blocks (`VectorSumBlock`), each from zero, then
// adds the blocks' sums in order; where M is even and has several blocks, the tasks split m at
// those blocks, each task's block of out as large as a core's L2 holds (the blocks of a one-
// thread `BlockGrid`), the later blocks' sums kept apart and added to the first's in order at
// the end.  Splitting out's rows instead, as the tiles do, packs each chunk of g once per block
// of rows: with two threads, twice at ladder-6.4m's shapes, where packing took ~9% of the call
// (perf, 2026-12-06, a 2-core AMD EPYC).  An odd M (its last row added after all the blocks)
// and a single block keep the split of out.
template <typename Rows>
void ProductAvx512(ffi::ThreadPool& pool, const Rows& rows, const uint16_t* g, int64_t M,
                   int64_t N, float* c, int64_t ldc, int64_t pp, int64_t np, int64_t threads) {
  const int64_t mp = RoundUp(M, 32), sum_block = VectorSumBlock(N);
  const int64_t m_blocks = (M + sum_block - 1) / sum_block;
  const BlockGrid whole(pp, np, 1, Rows::kStageCost);
  const bool split_m = M % 2 == 0 && m_blocks > 1 && whole.tasks() * m_blocks >= threads;
  const BlockGrid grid = split_m ? whole : BlockGrid(pp, np, threads, Rows::kStageCost);
  const int64_t spans = split_m ? m_blocks : 1;  // tasks per block of out
  // The sums of the blocks of m after the first: each task's own (split_m), or per task the
  // block of out's sums of its later blocks while the task runs them (`BlockProductAvx512`).
  static thread_local Scratch block_sums;
  float* kept = split_m ? static_cast<float*>(block_sums.get(
                              (m_blocks - 1) * pp * np * sizeof(float)))
                        : nullptr;
  ParallelFor(pool, grid.tasks() * spans, [&](int64_t t) {
    static thread_local Scratch later_blocks;
    const int64_t span = t % spans;
    const auto [p0, p1, n0, n1, bc, ac] = grid.At(t / spans, pp, np);
    if (split_m) {
      float* sums = span == 0 ? nullptr : kept + (span - 1) * pp * np + p0 * np + n0;
      BlockProductAvx512(rows, g, M, N, c, ldc, p0, p1, n0, n1, bc, ac, sums, np,
                         span * sum_block, std::min(mp, (span + 1) * sum_block), true);
      return;
    }
    float* partial = M - M % 2 > sum_block ? static_cast<float*>(later_blocks.get(
                                                 (p1 - p0) * (n1 - n0) * sizeof(float)))
                                           : nullptr;
    BlockProductAvx512(rows, g, M, N, c, ldc, p0, p1, n0, n1, bc, ac, partial, n1 - n0, 0, mp,
                       false);
  });
  if (!split_m) return;
  // out = ((first + second) + third) ...: XLA's order, float32 adds as it rounds them.
  ParallelFor(pool, pp / kBlock, [&](int64_t t) {
    for (int64_t p = t * kBlock; p < (t + 1) * kBlock; ++p) {
      for (int64_t b = 1; b < m_blocks; ++b) {
        const float* from = kept + (b - 1) * pp * np + p * np;
        float* to = c + p * ldc;
        for (int64_t n = 0; n < np; n += 16) {
          _mm512_storeu_ps(to + n, _mm512_add_ps(_mm512_loadu_ps(to + n),
                                                  _mm512_loadu_ps(from + n)));
        }
      }
    }
  });
}

// out (P, N) = X^T G from `rows` (X^T, or x and its row parameters) and g (M, N), on the pool.
template <typename Rows>
void Product(ffi::ThreadPool& pool, const Rows& rows, const uint16_t* g, int64_t P, int64_t M,
             int64_t N, float* out) {
  if (P == 0 || N == 0) return;
  if (M == 0) {
    std::memset(out, 0, P * N * sizeof(float));
    return;
  }
  const int64_t pp = RoundUp(P, kBlock), np = RoundUp(N, kBlock);
  // The sums go straight to out where its shape fits the tiles (the training step's).
  static thread_local Scratch c_pad;
  float* c = out;
  int64_t ldc = N;
  if (pp != P || np != N) {
    c = static_cast<float*>(c_pad.get(pp * np * sizeof(float)));
    ldc = np;
  }
  // XLA's own product takes the tiles where there are any, and the sums' order follows
  // (BITNET_JAX_CPU_AMX chose the routing when the program was traced).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (bitnet_amx::Granted()) {
    const BlockGrid grid(pp, np, threads, Rows::kStageCost);
    ParallelFor(pool, grid.tasks(), [&](int64_t t) {
      const auto [p0, p1, n0, n1, bc, ac] = grid.At(t, pp, np);
      bitnet_amx::Configure();
      BlockProduct(rows, g, M, N, c, ldc, p0, p1, n0, n1, bc, ac);
      bitnet_amx::Release();
    });
  } else {
    ProductAvx512(pool, rows, g, M, N, c, ldc, pp, np, threads);
  }
  if (c != out) {
    for (int64_t p = 0; p < P; ++p) std::memcpy(out + p * N, c + p * ldc, N * sizeof(float));
  }
}

ffi::Error NotRunnable(const char* name) {
  return ffi::Error::Internal(std::string(name) + ": this CPU has neither AMX tiles (with "
                              "Linux's permission) nor AVX512-BF16");
}

inline const uint16_t* Bits(const ffi::Buffer<ffi::BF16>& b) {
  return reinterpret_cast<const uint16_t*>(b.typed_data());
}

ffi::Error WeightGradientDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> xt,
                                 ffi::Buffer<ffi::BF16> g, ffi::ResultBuffer<ffi::F32> out) {
  auto ad = xt.dimensions();
  auto gd = g.dimensions();
  auto od = out->dimensions();
  if (ad.size() != 2 || gd.size() != 2 || od.size() != 2 || gd[0] != ad[1] ||
      od[0] != ad[0] || od[1] != gd[1]) {
    return ffi::Error::InvalidArgument(
        "bitnet_weight_gradient_dot: expects xt (P, M), g (M, N), out (P, N)");
  }
  if (!bitnet_amx::Bf16ProductsRunnable()) return NotRunnable("bitnet_weight_gradient_dot");
  const int64_t P = ad[0], M = ad[1], N = gd[1];
  Product(pool, TransposedRows{Bits(xt), P, M}, Bits(g), P, M, N, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error QuantizedWeightGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                       ffi::Buffer<ffi::F32> mult, ffi::Buffer<ffi::F32> scale,
                                       ffi::Buffer<ffi::BF16> g, int32_t lo, int32_t hi,
                                       ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || gd.size() != 2 || od.size() != 2 || gd[0] != xd[0] ||
      od[0] != xd[1] || od[1] != gd[1] || mult.dimensions().size() != 1 ||
      mult.dimensions()[0] != xd[0] || scale.dimensions().size() != 1 ||
      scale.dimensions()[0] != xd[0]) {
    return ffi::Error::InvalidArgument(
        "bitnet_quantized_weight_gradient: expects x (M, P), mult (M,), scale (M,), "
        "g (M, N), out (P, N)");
  }
  if (!bitnet_amx::Bf16ProductsRunnable()) return NotRunnable("bitnet_quantized_weight_gradient");
  const int64_t M = xd[0], P = xd[1], N = gd[1];
  const QuantizedRows rows{Bits(x), mult.typed_data(), scale.typed_data(),
                           static_cast<float>(lo), static_cast<float>(hi), P, M};
  Product(pool, rows, Bits(g), P, M, N, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetWeightGradientDot, WeightGradientDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetQuantizedWeightGradient, QuantizedWeightGradientImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("lo")
                                  .Attr<int32_t>("hi")
                                  .Ret<ffi::Buffer<ffi::F32>>());
