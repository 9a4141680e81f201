// The element-wise passes around the GEMMs, on raw row-major buffers, shared by every device:
//   forward:  out = act(acc + bias) (then dropout), optionally keeping preact = acc + bias;
//   backward: grad_pre = grad_out * act'(saved) (times the dropout mask), with per-row-block column
//             sums for the bias gradient.
// Each device supplies the two launchers below (cpu/launch.cpp, cuda/epilogue.cu).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "activations.h"
#include "dropout.h"

namespace pyfastnn {

struct ForwardEpilogue {
  c10::ScalarType dtype;
  Activation activation;
  double negative_slope;
  int64_t cols;
  const void* acc;     // rows x cols GEMM result
  const void* bias;    // cols, or null (always null on CUDA, where the GEMM adds it)
  void* preact;        // rows x cols, or null; may alias acc
  void* out;           // rows x cols; may alias acc
  // Dropout after the activation when keep_mask is set: element e is kept (keep_mask[e] = 1, out
  // scaled by 1 / (1 - p)) or zeroed (keep_mask[e] = 0), as drawn by `dropout` on the CPU; the CUDA
  // launcher draws a Philox state from torch's CUDA generator instead (PhiloxDropout).
  uint8_t* keep_mask = nullptr;  // rows x cols, or null
  DropoutStream dropout{};  // CPU only
  double dropout_p = 0.0;
  // CUDA only, relu: also write the bit mask of out > 0 (after dropout, if any; NOTE [relu bit masks]
  // in layer.h), relu_mask_row_bytes bytes per row, bit c % 8 of byte c / 8; every byte is written,
  // the padding past a row's last column as 0.
  uint8_t* relu_mask = nullptr;
  int64_t relu_mask_row_bytes = 0;
};

struct BackwardEpilogue {
  c10::ScalarType dtype;
  Activation activation;
  double negative_slope;
  int64_t cols;
  const void* grad_out;  // rows x cols
  const void* saved;     // rows x cols output or pre-activation; unused for identity
  void* grad_pre;        // rows x cols, or null (identity: grad_out is grad_pre)
  void* column_sums;     // or null. Launchers: blocks x cols accumulators (float, double for double),
                         // row b summing rows [b * rows_per_block, ...): the CPU kernels add into
                         // zeros, the CUDA kernel writes each row whole. Kernels: one row.
  // The forward's dropout mask, or null. With a mask, grad_pre is also multiplied by keep / (1 - p),
  // and a saved *output* is the dropped-out one: kept elements are rescaled by (1 - p) before the
  // derivative is taken from them where its value matters (dropped ones get no gradient anyway).
  const uint8_t* keep_mask = nullptr;
  double dropout_p = 0.0;
  bool saved_is_output = false;  // which of the two `saved` is (derivative_from_output)
};

// How one backward pass treats the saved tensor and the dropout mask, decided once per launch for
// the kernels of every device.
struct BackwardFlags {
  bool rescale_saved;  // the saved output went through dropout and act' reads more than its sign:
                       // scale it back by (1 - p)
  bool mask_implied;   // the saved output went through dropout and act' vanishes where it is 0
                       // (relu, sigmoid): skip reading the mask
  double saved_scale;  // 1 - p
  double kept_scale;   // dropout_kept_scale(p) with a mask, else 1
  double negative_slope;
};

inline BackwardFlags backward_flags(const BackwardEpilogue& a) {
  BackwardFlags flags{};
  // An activation torch derives from its output is always given its output (identity reads none).
  TORCH_INTERNAL_ASSERT(a.saved_is_output || a.activation == Activation::Identity ||
                        !derivative_from_output(a.activation));
  const bool dropped_out_output = a.keep_mask != nullptr && a.saved_is_output;
  flags.rescale_saved = dropped_out_output && !derivative_reads_positivity_only(a.activation);
  flags.mask_implied = dropped_out_output && derivative_vanishes_at_zero_output(a.activation);
  flags.saved_scale = 1.0 - a.dropout_p;
  flags.kept_scale = a.keep_mask != nullptr ? dropout_kept_scale(a.dropout_p) : 1.0;
  flags.negative_slope = a.negative_slope;
  return flags;
}

// The one switch from a runtime dtype to a compile-time element type, shared by the CPU and CUDA
// kernels: `visit_dtype(dtype, [&](auto tag) { using scalar_t = decltype(tag); ... })`.
template <typename Body>
void visit_dtype(c10::ScalarType dtype, Body&& body) {
  switch (dtype) {
    case c10::ScalarType::Float: return body(float{});
    case c10::ScalarType::Double: return body(double{});
    case c10::ScalarType::BFloat16: return body(c10::BFloat16{});
    case c10::ScalarType::Half: return body(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "pyfastnn: unsupported dtype ", dtype);
  }
}

// backward_rows_per_block: the rows per bias-gradient block of a rows x cols backward pass, each
// device's own tuning; it depends only on the shape, so the sums are bitwise reproducible.
namespace cpu {
void launch_forward_epilogue(const ForwardEpilogue& args, int64_t rows);
void launch_backward_epilogue(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block);
int64_t backward_rows_per_block(int64_t rows, int64_t cols);
}  // namespace cpu

namespace cuda {  // built only with CUDA (PYFASTNN_WITH_CUDA)
void launch_forward_epilogue(const ForwardEpilogue& args, int64_t rows);
void launch_backward_epilogue(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block);
int64_t backward_rows_per_block(int64_t rows, int64_t cols);
}  // namespace cuda

}  // namespace pyfastnn
