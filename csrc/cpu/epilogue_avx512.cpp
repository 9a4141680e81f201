// AVX-512 build of the epilogue kernels, run only where the CPU reports AVX-512 (dispatch.cpp).
// See epilogue_avx2.cpp for why the feature macros are set by hand.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd")
// GCC 12's own avx512fintrin.h starts lane shuffles from _mm512_undefined_* values and then warns
// about them (-Wuninitialized) when ATen's vec_reduce_all inlines them; our code is unaffected.
#pragma GCC diagnostic ignored "-Wuninitialized"
#define PYFASTNN_DEFINE_ISA_MACROS_AVX2
#define PYFASTNN_DEFINE_ISA_MACROS_AVX512
#include "isa_macros.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "epilogue_impl.h"
#endif
