// Feature macros matching a `#pragma GCC target(...)` at the top of an epilogue_<isa>.cpp file.
#pragma once

#ifdef PYFASTNN_DEFINE_ISA_MACROS_AVX2
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif

#ifdef PYFASTNN_DEFINE_ISA_MACROS_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512CD__
#define __AVX512CD__ 1
#endif
#endif
