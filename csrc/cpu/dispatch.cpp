// Run-time choice among the per-capability builds of the epilogue kernels (epilogue_kernels.cpp).
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

// NOTE [ Linking AVX and non-AVX files ]
// epilogue_kernels.cpp is compiled once per CPU capability, each copy with its own instruction-set
// flags (-mavx2 ..., -mavx512f ...) and its own namespace (pyfastnn::cpu::AVX2, ...), exactly as
// ATen builds aten/src/ATen/native/cpu. Only functions in those namespaces differ by name; an inline
// function from a shared header (c10, ATen, the standard library) that the compiler chooses not to
// inline is emitted in every object that calls it, in the AVX2 object compiled with AVX2
// instructions. The linker keeps one copy, the first it sees; had it kept the AVX2 one, code outside
// the dispatch below would run AVX2 instructions and crash a CPU without them. So both builds
// (setup.py and cmake/PyfastnnSources.cmake, from the one list in cmake/sources.json) link every
// other object first, then the kernel objects in the order DEFAULT, AVX2, AVX512: every such
// function of an AVX object is also in the DEFAULT kernel object (same source), whose copy wins; the
// ctest pyfastnn_ops_kernel_objects (cmake/CheckKernelObjects.cmake) checks exactly that. The kernel
// translation unit also stays lean (the kernels and the headers they need, no globals with
// constructors), so that few such functions exist at all. The build defines
// PYFASTNN_HAVE_CPU_CAPABILITY_<NAME> for every copy it compiled: exactly the copies declared here.

namespace pyfastnn::cpu {

namespace DEFAULT {
const EpilogueKernels& kernels();
}
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX2
namespace AVX2 {
const EpilogueKernels& kernels();
}
#endif
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX512
namespace AVX512 {
const EpilogueKernels& kernels();
}
#endif

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
const EpilogueKernels& select_kernels() {
  // ATen's own choice: what the CPU supports, capped by ATEN_CPU_CAPABILITY. Following it keeps our
  // epilogues on the same instruction set as the ATen GEMMs and element-wise ops around them.
  const std::string capability = at::get_cpu_capability();
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX512
  if (capability == "AVX512") return AVX512::kernels();
#endif
#ifdef PYFASTNN_HAVE_CPU_CAPABILITY_AVX2
  if (capability == "AVX2" || capability == "AVX512") return AVX2::kernels();
#endif
  return DEFAULT::kernels();
}
}  // namespace

const EpilogueKernels& epilogue_kernels() {
  static const EpilogueKernels& chosen = select_kernels();
  return chosen;
}

}  // namespace pyfastnn::cpu
