// Exact int8 activations x 2-bit packed ternary weights -> int32, for XLA:CPU as an FFI custom
// call; the weights are unpacked in registers and never exist as int8 in memory.
//
//   out[m, n] = sum_k x[m, k] * c[n, k]      x: (M, K) int8, c in {-1, 0, 1}
//
// The weights come in our (= transformers') 2-bit layout, packed: (R, K) uint8, R = ceil(N/4):
// byte packed[r, k] holds u = c + 1 of rows r, r+R, r+2R, r+3R in bits [1:0], [3:2], [5:4],
// [7:6]. One 64-byte load of a packed row thus feeds four output rows; (p >> 2j) & 3 gives
// u in {0, 1, 2} as unsigned bytes, the unsigned operand of AVX512-VNNI's vpdpbusd, with x as
// the signed one:  sum_k x * c = sum_k x * u - sum_k x.  int32 wraps like XLA's int32 dot, so
// the result is bit-identical to the int8 product (tests/test_cpu_decode.py).
//
// Memory-bound at decode shapes (M of a few rows): every packed byte is read once per call and
// every x row stays in L1. Rows of `packed` are split over XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

__attribute__((always_inline)) inline __m512i Dpbusd(__m512i acc, __m512i a, __m512i b) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));  // acc += dot4(u8 a, s8 b)
  return acc;
}

// The four 2-bit fields of 64 packed bytes as unsigned bytes 0..2.
__attribute__((always_inline)) inline void Unpack(__m512i p, __m512i (&u)[4]) {
  const __m512i three = _mm512_set1_epi8(3);
  u[0] = _mm512_and_si512(p, three);
  u[1] = _mm512_and_si512(_mm512_srli_epi16(p, 2), three);  // bits never cross bytes after &3
  u[2] = _mm512_and_si512(_mm512_srli_epi16(p, 4), three);
  u[3] = _mm512_and_si512(_mm512_srli_epi16(p, 6), three);
}

// Packed rows [r0, r1) times ROWS rows of x; xsum[i] = sum_k x[i, k].
template <int ROWS>
void Tile(const int8_t* __restrict x, int64_t K, const uint8_t* __restrict packed, int64_t R,
          int64_t N, int64_t r0, int64_t r1, const int32_t* xsum, int32_t* __restrict out) {
  const int64_t kfull = K / 64 * 64;
  const __mmask64 tail = K > kfull ? (~0ull) >> (64 - (K - kfull)) : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * K;
    __m512i acc[ROWS][4];
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kfull; k += 64) {
      __m512i u[4];
      Unpack(_mm512_loadu_si512(row + k), u);
#pragma GCC unroll 16
      for (int i = 0; i < ROWS; ++i) {
        const __m512i xv = _mm512_loadu_si512(x + i * K + k);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[i][j] = Dpbusd(acc[i][j], u[j], xv);
      }
    }
    if (tail) {  // zeros past K on both sides contribute nothing
      __m512i u[4];
      Unpack(_mm512_maskz_loadu_epi8(tail, row + kfull), u);
#pragma GCC unroll 16
      for (int i = 0; i < ROWS; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi8(tail, x + i * K + kfull);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[i][j] = Dpbusd(acc[i][j], u[j], xv);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int64_t n = r + j * R;
      if (n >= N) break;  // padding rows of the last packed block
#pragma GCC unroll 16
      for (int i = 0; i < ROWS; ++i) {
        const uint32_t s = static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j]));
        out[i * N + n] = static_cast<int32_t>(s - static_cast<uint32_t>(xsum[i]));
      }
    }
  }
}

void Rows(const int8_t* x, int64_t rows, int64_t K, const uint8_t* packed, int64_t R, int64_t N,
          int64_t r0, int64_t r1, const int32_t* xsum, int32_t* out) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) Tile<4>(x + i * K, K, packed, R, N, r0, r1, xsum + i, out + i * N);
  switch (rows - i) {
    case 3: Tile<3>(x + i * K, K, packed, R, N, r0, r1, xsum + i, out + i * N); break;
    case 2: Tile<2>(x + i * K, K, packed, R, N, r0, r1, xsum + i, out + i * N); break;
    case 1: Tile<1>(x + i * K, K, packed, R, N, r0, r1, xsum + i, out + i * N); break;
    default: break;
  }
}

ffi::Error TernaryDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                          ffi::Buffer<ffi::U8> packed, ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions();
  auto pd = packed.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || pd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument(
        "bitnet_ternary_dot: expects x (M, K), packed (ceil(N/4), K), out (M, N)");
  }
  const int64_t M = xd[0], K = xd[1], R = pd[0], N = od[1];
  if (pd[1] != K || od[0] != M || R != (N + 3) / 4) {
    return ffi::Error::InvalidArgument("bitnet_ternary_dot: shape mismatch");
  }
  int32_t* o = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int8_t* xp = x.typed_data();
  std::vector<int32_t> xsum(M);
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += xp[m * K + k];
    xsum[m] = s;
  }
  const uint8_t* pp = packed.typed_data();
  const int64_t chunk = 16;  // packed rows (64 outputs) per task
  const std::function<void(int64_t)> fn = [&](int64_t t) {
    const int64_t r0 = t * chunk, r1 = std::min(R, r0 + chunk);
    Rows(xp, M, K, pp, R, N, r0, r1, xsum.data(), o);
  };
  bitnet_ffi::ParallelFor(pool, (R + chunk - 1) / chunk, fn);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetTernaryDot, TernaryDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
