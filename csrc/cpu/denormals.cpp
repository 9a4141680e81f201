#include "cpu/denormals.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <thread>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace pyfastnn::cpu {

int64_t set_flush_denormal_on_threads(bool on, int64_t min_threads) {
  // ATen's own switch (the one torch.set_flush_denormal uses), so both agree on what the mode is and
  // on which CPUs have it.
  if (!at::globalContext().setFlushDenormal(on)) {
    return 0;
  }
  const int previous_threads = at::get_num_threads();
  const int64_t team = std::max<int64_t>(previous_threads, min_threads);
  if (team != previous_threads) {
    at::set_num_threads(static_cast<int>(team));
  }
  std::mutex mutex;
  std::set<std::thread::id> reached{std::this_thread::get_id()};
  at::parallel_for(0, team, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::globalContext().setFlushDenormal(on);
    }
    std::lock_guard<std::mutex> lock(mutex);
    reached.insert(std::this_thread::get_id());
  });
  if (team != previous_threads) {
    at::set_num_threads(previous_threads);
  }
  return static_cast<int64_t>(reached.size());
}

bool flush_denormal_enabled() {
#if defined(__SSE__) || defined(_M_X64)
  constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;  // MXCSR bits
  return (_mm_getcsr() & (kFlushToZero | kDenormalsAreZero)) == (kFlushToZero | kDenormalsAreZero);
#elif defined(__aarch64__)
  uint64_t fpcr = 0;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  return (fpcr & (uint64_t{1} << 24)) != 0;  // FZ
#else
  return false;
#endif
}

}  // namespace pyfastnn::cpu
