// One cuBLASLt GEMM with an optional fused epilogue, on torch's cuBLASLt handle and current stream
// (CUDA builds only). Column-major like cuBLAS: D (m x n, ldd) = op(A) op(B) (+ epilogue), with
// op(A) m x k and op(B) k x n. gemm.cpp maps the row-major layers onto it.
//
// NOTE [cuBLASLt epilogues and the fallback]
// cuBLASLt fuses the bias, relu and the tanh-form GELU into the GEMM's epilogue, and in backward the
// activation derivative (from an auxiliary buffer the forward wrote) into the data-gradient GEMM and
// the bias gradient into the weight-gradient GEMM (BGRADB). Not DRELU_BGRAD / DGELU_BGRAD, which sum
// the bias gradient across the data-gradient GEMM's long side: on an H200 (bf16, 65536 x 1024 ->
// 1024) a relu stack taking them took 1.20x eager PyTorch's time, about 2.2x a plain GEMM per such
// call as estimated from the other GEMMs' costs (benchmarks/RESULTS.md, "First figures on an H200").
// cuBLASLt does not take every problem: float64, some shapes and alignments have no algorithm.
// lt_matmul then returns false *before* touching any output, and the caller runs the same math as
// ATen GEMMs plus our own element-wise pass. Setting the environment variable PYFASTNN_CUBLASLT=0
// forces that fallback everywhere (tests compare both paths against the same reference).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pyfastnn::cuda {

enum class GemmEpilogue {
  Default,      // D = op(A) op(B)
  Bias,         // D = op(A) op(B) + bias (bias: m, broadcast over columns)
  Relu,         // D = relu(op(A) op(B) + bias); bias may be null
  ReluAux,      // as Relu, and aux = bit mask of D > 0 (aux_ld bits per column, a multiple of 128)
  GeluTanh,     // D = gelu_tanh(op(A) op(B) + bias); bias may be null
  GeluTanhAux,  // as GeluTanh, and aux = the pre-activation (aux_ld elements per column, a multiple of 8)
  DRelu,        // D = op(A) op(B) * relu'(aux bit mask: 0 or 1); no bias
  DGeluTanh,    // D = op(A) op(B) * gelu_tanh'(aux pre-activation); no bias
  BiasGradB,    // D = op(A) op(B); bias = sums of op(B) over k (n entries): a bias gradient
};

struct LtGemm {
  c10::ScalarType dtype;  // of A, B, D, bias and a GELU aux: float, half or bfloat16
  bool transpose_a, transpose_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  GemmEpilogue epilogue = GemmEpilogue::Default;
  void* bias = nullptr;  // read by Bias/Relu/GeluTanh(+Aux), written by BiasGradB
  void* aux = nullptr;
  int64_t aux_ld = 0;
  float alpha = 1.0f;  // D = alpha * op(A) op(B), before the epilogue
};

// The alignment (bytes) cuBLASLt's epilogue kernels may assume of the bias and aux buffers, which its
// alignment preferences do not cover: lt_matmul declines a buffer aligned less.
constexpr uintptr_t kEpilogueAlignment = 16;

// False unless this build and the environment allow cuBLASLt (PYFASTNN_CUBLASLT != "0").
bool lt_enabled();

// Whether cuBLASLt is tried at all for these sizes and this dtype (cheap, host-only checks).
bool lt_supports(c10::ScalarType dtype, int64_t m, int64_t n, int64_t k);

// Runs the GEMM on the current stream and returns true, or returns false without writing anything
// when cuBLASLt declines (no algorithm for this problem); the caller then falls back.
bool lt_matmul(const LtGemm& gemm);

}  // namespace pyfastnn::cuda
