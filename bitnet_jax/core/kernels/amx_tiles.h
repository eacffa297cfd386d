// AMX tiles (Intel Sapphire Rapids and later) for the CPU kernels in this directory: whether
// this process may use them, and the one tile configuration they share.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

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

}  // namespace bitnet_amx
