// The k-th largest value of each row of a float array, for XLA:CPU, by bisection on its bits.
//
// `order_statistics.kth_largest` finds it without a sort: floats order as their bit patterns do
// once mapped to unsigned keys (key = bits ^ 0x8000 for a clear sign bit, ~bits for a set one:
// IEEE 754's total order, -NaN < -inf < ... < -0 < +0 < ... < inf < NaN, the order XLA's TopK
// sorts by), and the largest key t with at least k keys >= t in a row is the k-th largest key,
// built from the top bit down, one compare-and-count pass per bit. XLA runs each pass as an
// operation over the whole array (16 for bf16), writing an int32 copy for the count; this kernel
// maps a row to its keys once, in a scratch buffer, and runs every pass on them while they are
// in cache, compares and popcounts on 32 or 16 keys at a time. The same algorithm, so the same
// bits as `lax.top_k`'s k-th value.
//
// The operands are the raw bits (uint16 for bfloat16 and float16, which share the sign bit's
// place; uint32 for float32), rows (M, n) -> the k-th largest bits (M,). Rows are spread over
// XLA's intra-op thread pool by ffi_parallel.h's ParallelFor.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>

#include "ffi_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per task: rows of a few hundred values go 64 at a time, long rows one at a time.
constexpr int64_t kElementsPerTask = 1 << 14;

// The intrinsics for 16- and 32-bit keys, so that one bisection serves both.
template <typename U>
struct Lanes;

template <>
struct Lanes<uint16_t> {
  static constexpr int64_t kWidth = 32;
  using Mask = __mmask32;
  static Mask Tail(int64_t left) {
    return left >= 32 ? Mask(0xffffffffu) : Mask((1u << left) - 1);
  }
  static __m512i Load(Mask m, const uint16_t* p) { return _mm512_maskz_loadu_epi16(m, p); }
  static void Store(uint16_t* p, Mask m, __m512i v) { _mm512_mask_storeu_epi16(p, m, v); }
  static __m512i Set(uint32_t v) { return _mm512_set1_epi16(static_cast<int16_t>(v)); }
  static __m512i SignFill(__m512i b) { return _mm512_srai_epi16(b, 15); }
  static Mask AtLeast(Mask m, __m512i a, __m512i b) {
    return _mm512_mask_cmpge_epu16_mask(m, a, b);
  }
};

template <>
struct Lanes<uint32_t> {
  static constexpr int64_t kWidth = 16;
  using Mask = __mmask16;
  static Mask Tail(int64_t left) { return left >= 16 ? Mask(0xffff) : Mask((1u << left) - 1); }
  static __m512i Load(Mask m, const uint32_t* p) { return _mm512_maskz_loadu_epi32(m, p); }
  static void Store(uint32_t* p, Mask m, __m512i v) { _mm512_mask_storeu_epi32(p, m, v); }
  static __m512i Set(uint32_t v) { return _mm512_set1_epi32(static_cast<int32_t>(v)); }
  static __m512i SignFill(__m512i b) { return _mm512_srai_epi32(b, 31); }
  static Mask AtLeast(Mask m, __m512i a, __m512i b) {
    return _mm512_mask_cmpge_epu32_mask(m, a, b);
  }
};

// The k-th largest of n bit patterns (1 <= k <= n); their keys written to `keys` (n slots).
template <typename U>
U KthLargest(const U* bits, int64_t n, int64_t k, U* keys) {
  using L = Lanes<U>;
  constexpr uint32_t kSign = 1u << (8 * sizeof(U) - 1);
  const __m512i sign = L::Set(kSign);
  for (int64_t i = 0; i < n; i += L::kWidth) {
    const auto m = L::Tail(n - i);
    const __m512i b = L::Load(m, bits + i);
    // ~b where the sign is set, b ^ sign where it is clear: b ^ (sign-extended sign | sign)
    L::Store(keys + i, m, _mm512_xor_si512(b, _mm512_or_si512(L::SignFill(b), sign)));
  }
  uint32_t found = 0;
  for (int bit = 8 * sizeof(U) - 1; bit >= 0; --bit) {
    const uint32_t candidate = found | (1u << bit);
    const __m512i c = L::Set(candidate);
    int64_t count = 0;
    for (int64_t i = 0; i < n; i += L::kWidth) {
      const auto m = L::Tail(n - i);
      count += _mm_popcnt_u32(L::AtLeast(m, L::Load(m, keys + i), c));
    }
    if (count >= k) found = candidate;
  }
  return static_cast<U>(found & kSign ? found ^ kSign : ~found);
}

template <ffi::DataType T, typename U>
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
    std::unique_ptr<U[]> keys(new U[n]);  // every slot written before it is read
    const int64_t end = std::min(rows, (t + 1) * rows_per_task);
    for (int64_t r = t * rows_per_task; r < end; ++r) {
      result[r] = KthLargest(in + r * n, n, k, keys.get());
    }
  };
  bitnet_ffi::ParallelFor(pool, (rows + rows_per_task - 1) / rows_per_task, task);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetKthLargest16,
                              (KthLargestImpl<ffi::DataType::U16, uint16_t>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::DataType::U16>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::DataType::U16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetKthLargest32,
                              (KthLargestImpl<ffi::DataType::U32, uint32_t>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::DataType::U32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::DataType::U32>>());
