// Helpers the CPU kernels in this directory share: tail masks for 16-lane vectors and
// per-thread scratch memory.
#pragma once

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace bitnet_kernels {

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

}  // namespace bitnet_kernels
