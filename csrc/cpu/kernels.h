// The CPU kernel tables: each kernel source of cmake/sources.json's cpu_kernels is compiled once per
// CPU capability (epilogue_kernels.cpp, small_gemm_kernels.cpp) and fills its table in namespace
// pyfastnn::cpu::<CAPABILITY>; dispatch.cpp picks one copy of each at run time.
#pragma once

#include "../epilogue.h"

namespace pyfastnn::cpu {

// The element-wise passes of epilogue.h over a row range (launch.cpp splits the rows between threads).
struct EpilogueKernels {
  void (*forward)(const ForwardEpilogue& args, int64_t row_begin, int64_t row_end);
  // Adds the column sums of rows [row_begin, row_end) of grad_pre into args.column_sums (one row).
  void (*backward)(const BackwardEpilogue& args, int64_t row_begin, int64_t row_end);
  const char* isa;
};

// Small-batch products (float/double, contiguous row-major, 1 <= rows <= kSmallGemmRows):
//   xwt: y (rows x n) = a (rows x k) @ b^T, b (n x k);  a kernel call fills outputs [begin, end) of n
//   gw:  y (rows x k) = a (rows x n) @ b (n x k);       ... columns [begin, end) of k
//   gtx: y (n x k) = a^T @ b, a (rows x n), b (rows x k); ... rows [begin, end) of n
// gemm.cpp decides when they beat ATen's GEMM and splits the work between threads.
constexpr int64_t kSmallGemmRows = 4;
struct SmallGemm {
  c10::ScalarType dtype;
  int64_t rows, n, k;
  const void* a;
  const void* b;
  void* y;
};

struct SmallGemmKernels {
  void (*xwt)(const SmallGemm& args, int64_t begin, int64_t end);
  void (*gw)(const SmallGemm& args, int64_t begin, int64_t end);
  void (*gtx)(const SmallGemm& args, int64_t begin, int64_t end);
  const char* isa;
};

// The copies for the best instruction set this CPU supports (ATEN_CPU_CAPABILITY caps it, as in ATen).
const EpilogueKernels& epilogue_kernels();
const SmallGemmKernels& small_gemm_kernels();

// The instruction sets this build carries kernels for.
const char* compiled_isas();

}  // namespace pyfastnn::cpu
