// The epilogue kernels for one CPU capability, compiled once per capability (capability.h). Keep this
// translation unit lean: see NOTE [ Linking AVX and non-AVX files ] in dispatch.cpp.
#include "capability.h"  // first: the per-capability preamble

#include "epilogue_impl.h"

namespace pyfastnn::cpu {
namespace CPU_CAPABILITY {

const EpilogueKernels& epilogue_kernels() {
  static const EpilogueKernels table{&forward_epilogue, &backward_epilogue, PYFASTNN_CPU_CAPABILITY_NAME};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastnn::cpu
