// The epilogue kernels for one CPU capability. The build compiles this file once per capability
// (cmake/sources.json: DEFAULT everywhere; AVX2 and AVX512 on x86-64), each time with that
// capability's compiler flags (-mavx2 ..., -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2), so the
// compiler itself enables the instructions and defines the feature macros ATen's vec headers test.
// Keep this translation unit lean: see NOTE [ Linking AVX and non-AVX files ] in dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "compile epilogue_kernels.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (see cmake/sources.json)"
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
// GCC's own avx512fintrin.h starts lane shuffles from _mm512_undefined_* values and then warns
// about them (-Wuninitialized) when ATen's vec_reduce_all inlines them; our code is unaffected.
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "epilogue_impl.h"

namespace pyfastnn::cpu {
namespace CPU_CAPABILITY {

const EpilogueKernels& epilogue_kernels() {
  static const EpilogueKernels table{&forward_epilogue, &backward_epilogue, PYFASTNN_CPU_CAPABILITY_NAME};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastnn::cpu
