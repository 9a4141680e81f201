#include "cpu/denormals.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <set>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace pyfastnn::cpu {

namespace {

#ifdef _OPENMP
// Sets the OpenMP team size of the calling thread for one call and puts it back, whatever happens:
// at::set_num_threads would also reset MKL's, oneDNN's and the pthreadpool's thread settings.
class TeamSizeGuard {
 public:
  explicit TeamSizeGuard(int team) : previous_(omp_get_max_threads()) {
    if (team != previous_) {
      omp_set_num_threads(team);
    }
  }
  ~TeamSizeGuard() { omp_set_num_threads(previous_); }
  TeamSizeGuard(const TeamSizeGuard&) = delete;
  TeamSizeGuard& operator=(const TeamSizeGuard&) = delete;

 private:
  int previous_;
};
#endif

}  // namespace

int64_t set_flush_denormal_on_threads(bool on, int64_t min_threads) {
  TORCH_CHECK(min_threads >= 0 && min_threads <= std::numeric_limits<int>::max(),
              "set_flush_denormal_on_threads: min_threads out of range: ", min_threads);
  // ATen's own switch (the one torch.set_flush_denormal uses), so both agree on what the mode is and
  // on which CPUs have it.
  if (!at::globalContext().setFlushDenormal(on)) {
    return 0;
  }
  int64_t team = at::get_num_threads();
#ifdef _OPENMP
  team = std::max<int64_t>(team, min_threads);
  TeamSizeGuard team_size(static_cast<int>(team));
#endif
  std::mutex mutex;
  std::set<std::thread::id> reached{std::this_thread::get_id()};
  at::parallel_for(0, team, 1, [&](int64_t /*begin*/, int64_t /*end*/) {  // the mode is per thread, not per index
    at::globalContext().setFlushDenormal(on);
    std::lock_guard<std::mutex> lock(mutex);
    reached.insert(std::this_thread::get_id());
  });
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
