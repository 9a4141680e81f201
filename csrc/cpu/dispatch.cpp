// Run-time choice among the per-capability copies of the CPU kernel tables (kernels.h).
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

// NOTE [ Linking AVX and non-AVX files ]
// The kernel sources (epilogue_kernels.cpp, small_gemm_kernels.cpp) are compiled once per CPU
// capability, each copy with its own instruction-set flags (-mavx2 ..., -mavx512f ...) and its own
// namespace (pyfastnn::cpu::AVX2, ...), exactly as ATen builds aten/src/ATen/native/cpu. Only
// functions in those namespaces differ by name; an inline function from a shared header (c10, ATen,
// the standard library) that the compiler chooses not to inline is emitted in every object that calls
// it, in the AVX2 object compiled with AVX2 instructions. The linker keeps one copy, the first it
// sees; had it kept the AVX2 one, code outside the dispatch below would run AVX2 instructions and
// crash a CPU without them. So both builds (setup.py and cmake/PyfastnnSources.cmake, from the one
// list in cmake/sources.json) link every other object first, then the kernel objects in the order
// DEFAULT, AVX2, AVX512: every such function of an AVX object is also in a DEFAULT kernel object (same
// sources), whose copy wins; the ctest pyfastnn_ops_kernel_objects (cmake/CheckKernelObjects.cmake)
// checks exactly that. The kernel translation units also stay lean (the kernels and the headers they
// need, no globals with constructors), so that few such functions exist at all. The build defines
// PYFASTNN_HAVE_CPU_CAPABILITY_<NAME> for every copy it compiled: exactly the copies declared here.

namespace pyfastnn::cpu {

#define PYFASTNN_DECLARE_KERNEL_TABLES                \
  const EpilogueKernels& epilogue_kernels();          \
  const SmallGemmKernels& small_gemm_kernels();

namespace DEFAULT {
PYFASTNN_DECLARE_KERNEL_TABLES
}
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX2
namespace AVX2 {
PYFASTNN_DECLARE_KERNEL_TABLES
}
#define PYFASTNN_AVX2_TABLE(name) &AVX2::name
#else
#define PYFASTNN_AVX2_TABLE(name) nullptr
#endif
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX512
namespace AVX512 {
PYFASTNN_DECLARE_KERNEL_TABLES
}
#define PYFASTNN_AVX512_TABLE(name) &AVX512::name
#else
#define PYFASTNN_AVX512_TABLE(name) nullptr
#endif
#undef PYFASTNN_DECLARE_KERNEL_TABLES

const char* compiled_isas() {
  return "DEFAULT"
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX2
         " AVX2"
#endif
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX512
         " AVX512"
#endif
      ;
}

namespace {
// ATen's own choice: what the CPU supports, capped by ATEN_CPU_CAPABILITY. Following it keeps our
// kernels on the same instruction set as the ATen GEMMs and element-wise ops around them. A copy the
// build lacks is null.
template <typename Table>
const Table& select(const Table& (*default_copy)(), const Table& (*avx2_copy)(), const Table& (*avx512_copy)()) {
  const std::string capability = at::get_cpu_capability();
  if (avx512_copy != nullptr && capability == "AVX512") return avx512_copy();
  if (avx2_copy != nullptr && (capability == "AVX2" || capability == "AVX512")) return avx2_copy();
  return default_copy();
}
}  // namespace

const EpilogueKernels& epilogue_kernels() {
  static const EpilogueKernels& chosen = select<EpilogueKernels>(
      &DEFAULT::epilogue_kernels, PYFASTNN_AVX2_TABLE(epilogue_kernels), PYFASTNN_AVX512_TABLE(epilogue_kernels));
  return chosen;
}

const SmallGemmKernels& small_gemm_kernels() {
  static const SmallGemmKernels& chosen = select<SmallGemmKernels>(
      &DEFAULT::small_gemm_kernels, PYFASTNN_AVX2_TABLE(small_gemm_kernels), PYFASTNN_AVX512_TABLE(small_gemm_kernels));
  return chosen;
}

}  // namespace pyfastnn::cpu
