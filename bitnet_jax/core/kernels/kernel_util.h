// Helpers the CPU kernels in this directory share: bfloat16 conversions, per-row codes, tail
// masks for 16-lane vectors, rounding up to tiles, per-thread scratch memory, and whether the
// CPU has AVX512-BF16.
#pragma once

#include <cpuid.h>
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace bitnet_kernels {

// AVX512-BF16 (VDPBF16PS: pairs of bf16 products added to float32 lanes), on AMD Zen 4 and
// later and on Intel Cooper Lake and Sapphire Rapids and later.
inline bool HasAvx512Bf16() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  }();
  return has;
}

// The ISA of the functions that run VDPBF16PS (the library is built for AVX-512 VNNI; a
// function with this target runs only where HasAvx512Bf16).
#define BITNET_AVX512_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16"

// How XLA:CPU's bf16 dot (YNNPACK's VDPBF16PS kernels) sums a contraction on CPUs without AMX,
// which our vector kernels follow to give its bits: the contraction's even part in blocks of
// this many elements (4096 where the output has at most 16 columns, else 2048), each block's
// pairs from zero in one accumulator, the blocks' sums added in order, then an odd
// contraction's last product.  Found on a 2-core AMD EPYC (2026-12-05): every output of every
// probed product of 2 or more rows (contractions of 33 to 16384, 8 to 448 columns), none with
// another block size; a product of one row sums in another order (`cpu_int8.bf16_products_take`
// keeps those on XLA).
inline int64_t VectorSumBlock(int64_t out_cols) { return out_cols <= 16 ? 4096 : 2048; }

// v rounded up to a multiple of `to` (a tile's rows or columns).
inline int64_t RoundUp(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Lanes of a 16-lane vector that hold the first `rem` of what is left (none when rem <= 0).
inline __mmask16 TailMask16(int64_t rem) {
  return rem >= 16 ? __mmask16(0xffff) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1u);
}

// Per-thread scratch, grown on demand (64-byte aligned).
struct Scratch {
  void* p = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(p);
      size = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, size);
    }
    return p;
  }
};

// float32 -> bfloat16 bits, round to nearest even (XLA's convert); NaN stays a quiet NaN.
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// 16 float32 lanes -> 16 bfloat16 bit patterns, rounded as in ToBf16.
__attribute__((always_inline)) inline __m256i ToBf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  r = _mm512_mask_mov_epi32(r, nan, quiet_nan);
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 Bf16ToF32x16(const uint16_t* p, __mmask16 m) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

inline float Bf16ToF32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// clip(round_half_even(f * mult), lo, hi) as int32 lanes.
__attribute__((always_inline)) inline __m512i Codes16(__m512 f, __m512 mult, __m512 lo,
                                                      __m512 hi) {
  __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(f, mult),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(c, lo), hi));
}

// In place, r[i] holding 16 32-bit words of row i: afterwards r[j] holds column j.
__attribute__((always_inline)) inline void TransposeDwords16x16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Now r[4a+b] holds, in each 128-bit lane L, words (L*4 + {0..3}) rows 4a..4a+3 for word
  // column 4L + b'.  Finish with 128-bit lane shuffles.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

}  // namespace bitnet_kernels
