// Run-time choice among the per-instruction-set builds of the epilogue kernels.
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

namespace pyfastnn::cpu {

namespace DEFAULT {
const EpilogueKernels& kernels();
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYFASTNN_HAVE_X86_KERNELS 1
namespace AVX2 {
const EpilogueKernels& kernels();
}
namespace AVX512 {
const EpilogueKernels& kernels();
}
#endif

const char* compiled_isas() {
#ifdef PYFASTNN_HAVE_X86_KERNELS
  return "DEFAULT AVX2 AVX512";
#else
  return "DEFAULT";
#endif
}

namespace {
const EpilogueKernels& select_kernels() {
#ifdef PYFASTNN_HAVE_X86_KERNELS
  // ATen's own choice: what the CPU supports, capped by ATEN_CPU_CAPABILITY. Following it keeps our
  // epilogues on the same instruction set as the ATen GEMMs and element-wise ops around them.
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return AVX512::kernels();
  if (capability == "AVX2") return AVX2::kernels();
#endif
  return DEFAULT::kernels();
}
}  // namespace

const EpilogueKernels& epilogue_kernels() {
  static const EpilogueKernels& chosen = select_kernels();
  return chosen;
}

}  // namespace pyfastnn::cpu
