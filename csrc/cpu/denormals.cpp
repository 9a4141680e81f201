#include "cpu/denormals.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace pyfastnn::cpu {

bool set_flush_denormal_on_all_threads(bool on) {
  // ATen's own switch (the one torch.set_flush_denormal uses), so both agree on what the mode is and
  // on which CPUs have it.
  if (!at::globalContext().setFlushDenormal(on)) {
    return false;
  }
  // One index per pool thread: ATen's OpenMP parallel_for hands each thread of the team one chunk.
  std::atomic<bool> all_set{true};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!at::globalContext().setFlushDenormal(on)) {
        all_set = false;
      }
    }
  });
  return all_set.load();
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
