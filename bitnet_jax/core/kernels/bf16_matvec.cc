// bf16 x bf16 -> float32 products for decoding on AVX-512 CPUs, as an XLA FFI custom call.
//
//   out[m, n] = sum_k x[m, k] * w[k, n]      x: (M, K) bf16, w: (K, N) bf16 (Flax's in x out)
//
// At decode shapes (a few rows of x) the product is bound by reading w, and XLA:CPU's bf16 dot
// converts w to float32 in memory first (more than twice the traffic). Here w is read once, in
// place: 16 bf16 values widen to float32 in a register (a bf16 is the top half of a float32),
// and products accumulate in float32 (each bf16 x bf16 product is exact in float32, so only the
// summation order differs from XLA's). K is split into a fixed number of parts, each summed
// into its own float32 buffer by one task and added in order at the end, so the result does
// not depend on thread scheduling. Within a part, 16 rows of w are swept together across N:
// 16 sequential streams that the prefetchers follow.

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

constexpr int kCols = 64;     // output columns per register block (4 zmm)
constexpr int kRowsOfW = 16;  // rows of w swept together
constexpr int kMaxRows = 4;   // rows of x per register block (kMaxRows * 4 accumulators)

__attribute__((always_inline)) inline __m512 Widen(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// partial[i, nc : nc + width] += sum_{k0 <= k < k1} xf[i, k] * w[k, nc : nc + width].
template <int ROWS>
void Block(const float* xf, int64_t K, const uint16_t* w, int64_t N, int64_t k0, int64_t k1,
           int64_t nc, int width, float* partial) {
  __mmask16 mask[4];
  __m512 acc[ROWS][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const int rem = width - 16 * j;
    mask[j] = rem >= 16 ? __mmask16(0xffff) : rem > 0 ? __mmask16((1u << rem) - 1u) : 0;
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) acc[i][j] = _mm512_maskz_loadu_ps(mask[j], partial + i * N + nc + 16 * j);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const uint16_t* row = w + k * N + nc;
    __m512 wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = Widen(row + 16 * j, mask[j]);
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) {
      const __m512 xb = _mm512_set1_ps(xf[i * K + k]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) _mm512_mask_storeu_ps(partial + i * N + nc + 16 * j, mask[j], acc[i][j]);
}

void Part(const float* xf, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t k0,
          int64_t k1, float* partial) {
  std::memset(partial, 0, sizeof(float) * M * N);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
    for (int64_t kb = k0; kb < k1; kb += kRowsOfW) {
      const int64_t ke = std::min(k1, kb + kRowsOfW);
      for (int64_t nc = 0; nc < N; nc += kCols) {
        const int width = static_cast<int>(std::min<int64_t>(kCols, N - nc));
        const float* xr = xf + m0 * K;
        float* pr = partial + m0 * N;
        switch (rows) {
          case 4: Block<4>(xr, K, w, N, kb, ke, nc, width, pr); break;
          case 3: Block<3>(xr, K, w, N, kb, ke, nc, width, pr); break;
          case 2: Block<2>(xr, K, w, N, kb, ke, nc, width, pr); break;
          default: Block<1>(xr, K, w, N, kb, ke, nc, width, pr); break;
        }
      }
    }
  }
}

ffi::Error Bf16DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                       ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument("bitnet_bf16_dot: expects x (M, K), w (K, N), out (M, N)");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (wd[0] != K || od[0] != M || od[1] != N) {
    return ffi::Error::InvalidArgument("bitnet_bf16_dot: shape mismatch");
  }
  float* o = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.typed_data());
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t bits = static_cast<uint32_t>(xp[i]) << 16;
    std::memcpy(&xf[i], &bits, sizeof(float));
  }
  // A fixed split of K (not one per thread): the sum's order is the same on any pool.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(16, K / 128));
  const int64_t per_part = (K + parts - 1) / parts;
  std::vector<float> partials(parts * M * N);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  const std::function<void(int64_t)> fn = [&](int64_t p) {
    const int64_t k0 = p * per_part, k1 = std::min(K, k0 + per_part);
    Part(xf.data(), M, K, wp, N, k0, std::max(k0, k1), partials.data() + p * M * N);
  };
  bitnet_ffi::ParallelFor(pool, parts, fn);
  std::memcpy(o, partials.data(), sizeof(float) * M * N);
  for (int64_t p = 1; p < parts; ++p) {
    const float* src = partials.data() + p * M * N;
    for (int64_t i = 0; i < M * N; ++i) o[i] += src[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetBf16Dot, Bf16DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
