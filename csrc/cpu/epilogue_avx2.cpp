// AVX2 + FMA build of the epilogue kernels, run only where the CPU reports AVX2 (dispatch.cpp).
// The target pragma enables the instructions for this file alone; GCC does not define the matching
// feature macros for it, so they are set by hand for the headers (sleef.h, ATen vec) that test them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define PYFASTNN_DEFINE_ISA_MACROS_AVX2
#include "isa_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "epilogue_impl.h"
#endif
