// The k-th largest value of each row of a float array, for XLA:CPU, by bisection on its bits.
//
// `order_statistics.kth_largest` finds it without a sort: floats order as their bit patterns do
// once mapped to unsigned keys (key = bits ^ 0x8000 for a clear sign bit, ~bits for a set one:
// IEEE 754's total order, -NaN < -inf < ... < -0 < +0 < ... < inf < NaN, the order XLA's TopK
// sorts by), and the largest key t with at least k keys >= t in a row is the k-th largest key,
// built from the top bit down, one compare-and-count pass per bit. XLA runs each pass as an
// operation over the whole array (16 for bf16); this kernel runs all of them on one row while
// the row is in cache: 16 or 32 compares and popcounts per 32 or 16 keys, no memory written.
// The same algorithm, so the same bits as `lax.top_k`'s k-th value.
//
// The operands are the raw bits (uint16 for bfloat16 and float16, which share the sign bit's
// place; uint32 for float32), rows (M, n) -> the k-th largest bits (M,). Rows are spread over
// XLA's intra-op thread pool by ffi_parallel.h's ParallelFor.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per task: rows of a few hundred values go 64 at a time, long rows one at a time.
constexpr int64_t kElementsPerTask = 1 << 14;

inline __mmask32 Tail32(int64_t left) {
  return left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1);
}
inline __mmask16 Tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

// The k-th largest of n 16-bit patterns (1 <= k <= n); keys written to `keys` (n + 31 slots).
uint16_t KthLargest16(const uint16_t* bits, int64_t n, int64_t k, uint16_t* keys) {
  const __m512i top = _mm512_set1_epi16(static_cast<int16_t>(0x8000));
  for (int64_t i = 0; i < n; i += 32) {
    const __mmask32 m = Tail32(n - i);
    const __m512i b = _mm512_maskz_loadu_epi16(m, bits + i);
    // ~b where the sign is set, b ^ 0x8000 where it is clear: b ^ (sign-extended sign | 0x8000)
    const __m512i key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi16(b, 15), top));
    _mm512_mask_storeu_epi16(keys + i, m, key);
  }
  uint32_t found = 0;
  for (int bit = 15; bit >= 0; --bit) {
    const uint32_t candidate = found | (1u << bit);
    const __m512i c = _mm512_set1_epi16(static_cast<int16_t>(candidate));
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += 32) {
      const __mmask32 m = Tail32(n - i);
      count += _mm_popcnt_u32(
          _mm512_mask_cmpge_epu16_mask(m, _mm512_maskz_loadu_epi16(m, keys + i), c));
    }
    if (count >= k) found = candidate;
  }
  return static_cast<uint16_t>(found & 0x8000u ? found ^ 0x8000u : ~found);
}

// The same for 32-bit patterns (float32).
uint32_t KthLargest32(const uint32_t* bits, int64_t n, int64_t k, uint32_t* keys) {
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Tail16(n - i);
    const __m512i b = _mm512_maskz_loadu_epi32(m, bits + i);
    const __m512i key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), top));
    _mm512_mask_storeu_epi32(keys + i, m, key);
  }
  uint32_t found = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = found | (1u << bit);
    const __m512i c = _mm512_set1_epi32(static_cast<int32_t>(candidate));
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = Tail16(n - i);
      count += _mm_popcnt_u32(
          _mm512_mask_cmpge_epu32_mask(m, _mm512_maskz_loadu_epi32(m, keys + i), c));
    }
    if (count >= k) found = candidate;
  }
  return found & 0x80000000u ? found ^ 0x80000000u : ~found;
}

template <ffi::DataType T, typename U, U (*Kth)(const U*, int64_t, int64_t, U*)>
ffi::Error KthLargestImpl(ffi::ThreadPool pool, ffi::Buffer<T> x, int64_t k,
                          ffi::ResultBuffer<T> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || out->element_count() != dims[0]) {
    return ffi::Error::InvalidArgument("bitnet_kth_largest: expects x (M, n) and out (M,)");
  }
  const int64_t rows = dims[0], n = dims[1];
  if (rows == 0) return ffi::Error::Success();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("bitnet_kth_largest: k must be in [1, n]");
  }
  const U* in = reinterpret_cast<const U*>(x.typed_data());
  U* result = reinterpret_cast<U*>(out->typed_data());
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / n);
  const std::function<void(int64_t)> task = [&](int64_t t) {
    std::vector<U> keys(n + 32);
    const int64_t end = std::min(rows, (t + 1) * rows_per_task);
    for (int64_t r = t * rows_per_task; r < end; ++r) {
      result[r] = Kth(in + r * n, n, k, keys.data());
    }
  };
  bitnet_ffi::ParallelFor(pool, (rows + rows_per_task - 1) / rows_per_task, task);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetKthLargest16,
                              (KthLargestImpl<ffi::DataType::U16, uint16_t, KthLargest16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::DataType::U16>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::DataType::U16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetKthLargest32,
                              (KthLargestImpl<ffi::DataType::U32, uint32_t, KthLargest32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::DataType::U32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::DataType::U32>>());
