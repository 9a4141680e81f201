// The small-batch GEMM kernels for one CPU capability, compiled once per capability exactly like
// epilogue_kernels.cpp (cmake/sources.json's cpu_kernels). Keep this translation unit lean: see
// NOTE [ Linking AVX and non-AVX files ] in dispatch.cpp.
#include "capability.h"  // first: the per-capability preamble

#include "small_gemm_impl.h"

namespace pyfastnn::cpu {
namespace CPU_CAPABILITY {

const SmallGemmKernels& small_gemm_kernels() {
  static const SmallGemmKernels table{&small_xwt_entry, &small_gw_entry, &small_gtx_entry,
                                      PYFASTNN_CPU_CAPABILITY_NAME};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastnn::cpu
