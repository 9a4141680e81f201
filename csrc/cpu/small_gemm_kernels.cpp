// The small-batch GEMM kernels for one CPU capability, compiled once per capability exactly like
// epilogue_kernels.cpp (cmake/sources.json's cpu_kernels). Keep this translation unit lean: see
// NOTE [ Linking AVX and non-AVX files ] in dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "compile small_gemm_kernels.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (see cmake/sources.json)"
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
// GCC's own avx512fintrin.h starts lane shuffles from _mm512_undefined_* values and then warns
// about them (-Wuninitialized) when ATen's vec_reduce_all inlines them; our code is unaffected.
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

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
