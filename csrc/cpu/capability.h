// The preamble of every per-capability CPU kernel source (cmake/sources.json's cpu_kernels), and only
// of those: include it first. The build compiles each such source once per capability (DEFAULT
// everywhere; AVX2 and AVX512 on x86-64), each time with that capability's compiler flags (-mavx2 ...,
// -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2), so the compiler itself enables the instructions and
// defines the feature macros ATen's vec headers test.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile the CPU kernel sources with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> (see cmake/sources.json)"
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && !defined(__clang__)
// GCC's own avx512fintrin.h starts lane shuffles from _mm512_undefined_* values and then warns
// about them (-Wuninitialized) when ATen's vec_reduce_all inlines them; our code is unaffected.
// Set before any ATen vec header is included, for the rest of the translation unit.
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// The name of the capability this source is compiled for ("AVX2"), for the kernel tables' isa.
#define PYFASTNN_STRINGIFY_(x) #x
#define PYFASTNN_STRINGIFY(x) PYFASTNN_STRINGIFY_(x)
#define PYFASTNN_CPU_CAPABILITY_NAME PYFASTNN_STRINGIFY(CPU_CAPABILITY)
