// The CPU epilogue kernels, compiled once per CPU capability (epilogue_kernels.cpp) and picked at
// run time (dispatch.cpp).
#pragma once

#include "../epilogue.h"

namespace pyfastnn::cpu {

// Small-batch products (float/double, contiguous row-major, 1 <= rows <= kSmallGemmRows):
//   xwt: y (rows x n) = a (rows x k) @ b^T, b (n x k);  a kernel call fills outputs [begin, end) of n
//   gw:  y (rows x k) = a (rows x n) @ b (n x k);       ... columns [begin, end) of k
//   gtx: y (n x k) = a^T @ b, a (rows x n), b (rows x k); ... rows [begin, end) of n
constexpr int64_t kSmallGemmRows = 4;
struct SmallGemm {
  c10::ScalarType dtype;
  int64_t rows, n, k;
  const void* a;
  const void* b;
  void* y;
};
enum class SmallGemmKind { XWt, GW, GtX };

struct EpilogueKernels {
  void (*forward)(const ForwardEpilogue& args, int64_t row_begin, int64_t row_end);
  // Adds the column sums of rows [row_begin, row_end) of grad_pre into args.column_sums (one row).
  void (*backward)(const BackwardEpilogue& args, int64_t row_begin, int64_t row_end);
  void (*small_xwt)(const SmallGemm& args, int64_t begin, int64_t end);
  void (*small_gw)(const SmallGemm& args, int64_t begin, int64_t end);
  void (*small_gtx)(const SmallGemm& args, int64_t begin, int64_t end);
  const char* isa;
};

// Runs a small-batch product on the calling thread and at::parallel_for's pool.
void launch_small_gemm(SmallGemmKind kind, const SmallGemm& args);

// The kernels for the best instruction set this CPU supports (ATEN_CPU_CAPABILITY caps it, as in ATen).
const EpilogueKernels& epilogue_kernels();

// The instruction sets this build carries kernels for.
const char* compiled_isas();

}  // namespace pyfastnn::cpu
