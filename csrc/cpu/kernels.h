// The CPU epilogue kernels, compiled once per instruction set (epilogue_<isa>.cpp) and picked at
// run time (dispatch.cpp).
#pragma once

#include "../epilogue.h"

namespace pyfastnn::cpu {

struct EpilogueKernels {
  void (*forward)(const ForwardEpilogue& args, int64_t row_begin, int64_t row_end);
  // Adds the column sums of rows [row_begin, row_end) of grad_pre into args.column_sums (one row).
  void (*backward)(const BackwardEpilogue& args, int64_t row_begin, int64_t row_end);
  const char* isa;
};

// The kernels for the best instruction set this CPU supports (ATEN_CPU_CAPABILITY caps it, as in ATen).
const EpilogueKernels& epilogue_kernels();

// The instruction sets this build carries kernels for.
const char* compiled_isas();

}  // namespace pyfastnn::cpu
