// AMX tiles (Intel Sapphire Rapids and later) for the CPU kernels in this directory: whether
// this process may use them, the one tile configuration they share, and the 16 x 64 block of
// their packed products.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernel_util.h"

namespace bitnet_amx {

// AMX-TILE, AMX-INT8 and AMX-BF16 (every AMX CPU so far has all three), granted to this process
// by Linux, which gives a process the tiles' state only after it asks (arch_prctl; XLA's
// oneDNN asks too).
inline bool Granted() {
  static const bool granted = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool bf16 = d & (1u << 22), tile = d & (1u << 24), int8 = d & (1u << 25);
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return bf16 && tile && int8 &&
           syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// Where the backward's bf16 products (`input_gradient.cc`, `weight_gradient.cc`) can run: on
// tiles, or on AVX512-BF16 vectors (`cpu_int8.bf16_products` chose which when the program was
// traced).
inline bool Bf16ProductsRunnable() { return Granted() || bitnet_kernels::HasAvx512Bf16(); }

// Granted, and not switched off: BITNET_JAX_CPU_AMX=0, read at every call so that a process (a
// test) can switch it (`cpu_int8.AMX_ENV` names it too).
inline bool Usable() {
  const char* env = std::getenv("BITNET_JAX_CPU_AMX");
  return Granted() && !(env != nullptr && std::strcmp(env, "0") == 0);
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes: int32 or float32 sums (16 x 16), int8 (16 x 64) or bf16
// (16 x 32) operands.  Each task configures its thread's tiles (XLA's own AMX kernels
// configure theirs before each use) and releases them when done.
__attribute__((target("amx-tile"))) inline void Configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not see ldtilecfg read the struct and drops the stores above without this.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) inline void Release() { _tile_release(); }

// The packed products' 16 x 64 block, int8 (`int8_matmul.cc`, TDPBSSD: signed bytes, int32 sums)
// or bf16 (`input_gradient.cc`, TDPBF16PS: pairs, float32 sums): 16 rows of A, `lda` bytes apart,
// times one panel of B, over `steps` steps of 64 bytes of A's rows (64 int8 k or 32 bf16 n); the
// panel holds per step 16 rows of 256 bytes, four 16-column tiles side by side (4 KB per step).
// The four 16 x 16 sums go to `sums`, rows 256 bytes apart.  Tiles 0-3: the sums; 4: A; 5-7: B.
enum class PanelProduct { kInt8, kBf16 };

template <PanelProduct kind>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) inline void PanelSums(
    const void* a, int64_t lda, const void* panel, int64_t steps, void* sums) {
  constexpr int64_t kRowBytes = 256, kStepBytes = 16 * kRowBytes;
  constexpr bool kInt8 = kind == PanelProduct::kInt8;
  const uint8_t* a8 = static_cast<const uint8_t*>(a);
  const uint8_t* b8 = static_cast<const uint8_t*>(panel);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  // Tile numbers are immediates (the intrinsics paste them into the instruction's text), so
  // each product is written out.
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* b = b8 + s * kStepBytes;
    _tile_loadd(4, a8 + s * 64, lda);
    _tile_loadd(5, b, kRowBytes);
    if constexpr (kInt8) _tile_dpbssd(0, 4, 5); else _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 64, kRowBytes);
    if constexpr (kInt8) _tile_dpbssd(1, 4, 6); else _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 128, kRowBytes);
    if constexpr (kInt8) _tile_dpbssd(2, 4, 7); else _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 192, kRowBytes);
    if constexpr (kInt8) _tile_dpbssd(3, 4, 5); else _tile_dpbf16ps(3, 4, 5);
  }
  uint8_t* out = static_cast<uint8_t*>(sums);
  _tile_stored(0, out, kRowBytes);
  _tile_stored(1, out + 64, kRowBytes);
  _tile_stored(2, out + 128, kRowBytes);
  _tile_stored(3, out + 192, kRowBytes);
}

}  // namespace bitnet_amx
