// A parallel loop on XLA's FFI intra-op thread pool, for the CPU kernels in this directory.
// The calling thread takes part and never waits on a task that has not started, so it cannot
// deadlock when the pool is busy or runs tasks inline.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace bitnet_ffi {

struct ParState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  std::mutex mu;
  std::condition_variable cv;
};

inline void RunWorker(const std::shared_ptr<ParState>& st) {
  for (;;) {
    int64_t i = st->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= st->n) return;  // late starters touch nothing but the shared state
    (*st->fn)(i);
    if (st->done.fetch_add(1, std::memory_order_acq_rel) + 1 == st->n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n,
                        const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int64_t threads = pool.num_threads();
  if (threads <= 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto st = std::make_shared<ParState>();
  st->n = n;
  st->fn = &fn;
  int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([st]() { RunWorker(st); });
  RunWorker(st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load(std::memory_order_acquire) == n; });
}

}  // namespace bitnet_ffi
