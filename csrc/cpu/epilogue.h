// The element-wise passes around the GEMMs, on raw row-major buffers:
//   forward:  out = act(acc + bias), optionally keeping preact = acc + bias;
//   backward: grad_pre = grad_out * act'(saved), with per-block column sums for the bias gradient.
// They are compiled once per CPU instruction set (epilogue_<isa>.cpp) and picked at run time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../activations.h"

namespace pyfastnn::cpu {

struct ForwardEpilogue {
  c10::ScalarType dtype;
  Activation activation;
  double negative_slope;
  int64_t cols;
  const void* acc;     // rows x cols GEMM result
  const void* bias;    // cols, or null
  void* preact;        // rows x cols, or null; may alias acc
  void* out;           // rows x cols; may alias acc
};

struct BackwardEpilogue {
  c10::ScalarType dtype;
  Activation activation;
  double negative_slope;
  int64_t cols;
  const void* grad_out;  // rows x cols
  const void* saved;     // rows x cols output or pre-activation; unused for identity
  void* grad_pre;        // rows x cols, or null (identity: grad_out is grad_pre)
  void* column_sums;     // cols accumulators (float, or double for double), or null; zeroed by the caller
};

struct EpilogueKernels {
  void (*forward)(const ForwardEpilogue& args, int64_t row_begin, int64_t row_end);
  // Adds the column sums of rows [row_begin, row_end) of grad_pre into args.column_sums.
  void (*backward)(const BackwardEpilogue& args, int64_t row_begin, int64_t row_end);
  const char* isa;
};

// The kernels for the best instruction set this CPU supports (ATEN_CPU_CAPABILITY caps it, as in ATen).
const EpilogueKernels& epilogue_kernels();

// The instruction sets this build carries kernels for.
const char* compiled_isas();

}  // namespace pyfastnn::cpu
