// The per-layer flow shared by the fused ops: the device's GEMMs (cpu/gemm.h: small-batch kernels or
// ATen's; cuda/gemm.h: cuBLASLt with epilogues or ATen's) plus one fused element-wise pass each way,
// launched by the device's epilogue launcher.
#include "layer.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <atomic>

#include "cpu/gemm.h"
#include "epilogue.h"
#include "tensor_args.h"
#ifdef PYFASTNN_WITH_CUDA
#include "cuda/gemm.h"
#endif

namespace pyfastnn::detail {
namespace {

bool on_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// A lazily negated view (is_neg) as the values it stands for: the kernels read raw memory. The
// dispatcher resolves Tensor and Tensor[] arguments before its kernels, but not fused_mlp's Tensor?[]
// bias list, and the direct C++ functions run without it.
at::Tensor negation_applied(const at::Tensor& t) { return t.defined() && t.is_neg() ? t.resolve_neg() : t; }

// Only a CUDA build registers CUDA kernels, and check_kernel_input refuses CUDA tensors in the direct C++
// calls of a CPU-only build, so such a build never sees one here.
void launch(const ForwardEpilogue& args, int64_t rows, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_forward_epilogue(args, rows);
#endif
  TORCH_INTERNAL_ASSERT(!cuda_device);
  cpu::launch_forward_epilogue(args, rows);
}

void launch(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::launch_backward_epilogue(args, rows, rows_per_block);
#endif
  TORCH_INTERNAL_ASSERT(!cuda_device);
  cpu::launch_backward_epilogue(args, rows, rows_per_block);
}

// Bias-gradient rows are summed in fixed blocks whose partial sums are then added in a fixed order, so
// the result depends only on the shape, never on thread count or scheduling (bitwise reproducible).
// The block size is the device launcher's own tuning (epilogue.h).
int64_t rows_per_block(int64_t rows, int64_t cols, bool cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
  if (cuda_device) return cuda::backward_rows_per_block(rows, cols);
#endif
  TORCH_INTERNAL_ASSERT(!cuda_device);
  return cpu::backward_rows_per_block(rows, cols);
}

// The sum of the rows of a (blocks, cols) tensor of partial sums, added pairwise in a fixed order:
// log2(blocks) roundings per sum whatever the thread count (torch's CPU sum may split one long
// column between threads). Overwrites partial_sums; returns a copy of the first row, since a view
// would keep the whole (blocks, cols) buffer alive as long as the gradient.
at::Tensor add_block_sums(const at::Tensor& partial_sums) {
  int64_t rows = partial_sums.size(0);
  while (rows > 1) {
    const int64_t half = rows / 2;
    partial_sums.narrow(0, 0, half).add_(partial_sums.narrow(0, rows - half, half));
    rows -= half;
  }
  return partial_sums.select(0, 0).clone();
}

// The device's GEMMs for the gradients (cpu/gemm.h, cuda/gemm.h). grad @ w: the input gradient.
at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w) {
#ifdef PYFASTNN_WITH_CUDA
  if (on_cuda(grad)) return cuda::matmul_gw(grad, w);
#endif
  return cpu::matmul_gw(grad, w);
}

// grad^T @ x: the weight gradient, row-major (out, in) like the parameter.
at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x) {
#ifdef PYFASTNN_WITH_CUDA
  if (on_cuda(grad)) return cuda::matmul_gtx(grad, x);
#endif
  return cpu::matmul_gtx(grad, x);
}

// The backward element-wise pass: grad_pre = grad_out * act'(saved) (and the dropout mask) where
// grad_pre is defined, and the bias gradient (column sums of that product) when need_sums. The sums
// are taken in fixed row blocks (see rows_per_block), so they are bitwise reproducible.
struct BackwardPass {
  const at::Tensor& grad_out;
  const at::Tensor& saved;
  bool saved_is_output;
  Activation activation;
  double negative_slope;
  const LayerDropout& dropout;

  // Returns the bias gradient (undefined unless need_sums).
  at::Tensor run(const at::Tensor& grad_pre, bool need_sums) const {
    const int64_t rows = grad_out.size(0);
    const int64_t cols = grad_out.size(1);
    const bool cuda_device = on_cuda(grad_out);
    const int64_t block_rows = rows_per_block(rows, cols, cuda_device);
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    at::Tensor partial_sums;
    if (need_sums) {
      const auto options = grad_out.options().dtype(at::toOpMathType(grad_out.scalar_type()));
      const auto shape = blocks <= 1 ? std::vector<int64_t>{cols} : std::vector<int64_t>{blocks, cols};
      // The CUDA kernel writes every block's sums; the CPU kernels add into them. No rows: zeros.
      partial_sums = cuda_device && blocks > 0 ? at::empty(shape, options) : at::zeros(shape, options);
    }
    if (blocks > 0 && cols > 0 && (need_sums || grad_pre.defined())) {
      BackwardEpilogue args{grad_out.scalar_type(), activation, negative_slope, cols, grad_out.data_ptr(),
                            saved.defined() ? saved.data_ptr() : nullptr,
                            grad_pre.defined() ? grad_pre.data_ptr() : nullptr,
                            need_sums ? partial_sums.data_ptr() : nullptr};
      args.saved_is_output = saved_is_output;
      if (dropout.keep_mask.defined()) {
        args.keep_mask = dropout.keep_mask.data_ptr<uint8_t>();
        args.dropout_p = dropout.p;
      }
      launch(args, rows, block_rows, cuda_device);
    }
    if (!need_sums) return at::Tensor();
    // CUDA: torch's reduction, one launch in a fixed order; the CPU adds its many short blocks pairwise.
    at::Tensor sums = blocks <= 1 ? partial_sums : cuda_device ? partial_sums.sum(0) : add_block_sums(partial_sums);
    return sums.scalar_type() == grad_out.scalar_type() ? sums : sums.to(grad_out.scalar_type());
  }
};

// grads.input = grad_pre @ W; on CUDA with the layer below's relu or tanh-GELU derivative fused in
// where cuBLASLt takes it.
void input_grad(LayerGrads& grads, const at::Tensor& grad_pre, const at::Tensor& weight,
                [[maybe_unused]] const BelowLayer* below) {
#ifdef PYFASTNN_WITH_CUDA
  if (below != nullptr && on_cuda(weight)) {
    const bool relu = below->activation == Activation::Relu;
    TORCH_INTERNAL_ASSERT(below->aux.sizes() ==
                          at::IntArrayRef({grad_pre.size(0), relu ? relu_mask_row_bytes(weight.size(1))
                                                                  : weight.size(1)}));
    at::Tensor below_preact_grad =
        cuda::input_grad_through_below(grad_pre, weight, below->activation, negation_applied(below->aux), below->scale);
    if (below_preact_grad.defined()) {
      grads.input = below_preact_grad;
      grads.input_is_below_preact_grad = true;
      return;
    }
  }
#endif
  grads.input = matmul_gw(grad_pre, weight);
}

}  // namespace

at::Tensor as_matrix(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  // Rows are counted explicitly: reshape(-1, 0) is ambiguous for 0-sized feature dimensions.
  const auto sizes = t.sizes();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return t.reshape({rows, sizes.back()});
}

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t out_features) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = out_features;
  return shape;
}

bool keeps_relu_mask(const at::Tensor& input, Activation activation, bool last_layer) {
  const auto dtype = input.scalar_type();
  return input.is_cuda() && activation == Activation::Relu && !last_layer &&
         (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16);
}

int64_t relu_mask_row_bytes(int64_t features) { return (features + 127) / 128 * 16; }

namespace {
std::atomic<bool> relu_epilogue{false};  // NOTE [The relu epilogue and NaN]
}  // namespace

bool relu_epilogue_allowed() { return relu_epilogue.load(std::memory_order_relaxed); }
void set_relu_epilogue_allowed(bool allowed) { relu_epilogue.store(allowed, std::memory_order_relaxed); }

void layer_forward(const at::Tensor& x_arg, const at::Tensor& weight_arg, const std::optional<at::Tensor>& bias,
                   Activation activation, double negative_slope, const at::Tensor& out,
                   const at::Tensor* preact, const LayerDropout& dropout, bool relu_epilogue,
                   const at::Tensor* relu_mask) {
  const at::Tensor x = negation_applied(x_arg), weight = negation_applied(weight_arg);
  const int64_t rows = x.size(0);
  const int64_t out_features = weight.size(0);
  if (rows == 0 || out_features == 0) return;
  // The GEMM writes into the buffer that must hold x @ W^T + bias afterwards: the pre-activation when
  // it is kept, otherwise the output itself (then the epilogue runs in place).
  at::Tensor acc = preact != nullptr ? *preact : out;
  at::Tensor b = has_tensor(bias) ? negation_applied(*bias).contiguous() : at::Tensor();
  const bool cuda_device = on_cuda(x);
  if (cuda_device) {
#ifdef PYFASTNN_WITH_CUDA
    if (cuda::gemm_forward(x, weight, b, activation, dropout.keep_mask.defined(), relu_epilogue, out, preact,
                           relu_mask)) {
      return;
    }
#endif
    b = at::Tensor();  // on CUDA the GEMM has added it (NOTE [CUDA epilogue passes])
  } else if (cpu::matmul_xwt_out(x, weight, b, acc)) {
    b = at::Tensor();  // added inside the GEMM (bfloat16/half, as F.linear rounds once)
  }
  // Identity with no bias left to add, no dropout and no pre-activation: the GEMM wrote the output.
  if (activation == Activation::Identity && !b.defined() && preact == nullptr && !dropout.keep_mask.defined()) return;
  ForwardEpilogue args{x.scalar_type(),
                       activation,
                       negative_slope,
                       out_features,
                       acc.data_ptr(),
                       b.defined() ? b.data_ptr() : nullptr,
                       preact != nullptr ? preact->data_ptr() : nullptr,
                       out.data_ptr()};
  if (dropout.keep_mask.defined()) {
    args.keep_mask = dropout.keep_mask.data_ptr<uint8_t>();
    args.dropout = dropout.stream;  // CPU only: the CUDA launcher draws its own Philox state
    args.dropout_p = dropout.p;
  }
  if (relu_mask != nullptr) {  // cuBLASLt did not write it: the pass does, from the (dropped-out) output
    TORCH_INTERNAL_ASSERT(activation == Activation::Relu && relu_mask->size(1) == relu_mask_row_bytes(out_features));
    args.relu_mask = relu_mask->data_ptr<uint8_t>();
    args.relu_mask_row_bytes = relu_mask->size(1);
  }
  launch(args, rows, cuda_device);
}

LayerGrads layer_backward(const at::Tensor& grad_out_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg,
                          const at::Tensor& saved_arg, bool saved_is_output, Activation activation,
                          double negative_slope,
                          const LayerDropout& dropout, bool need_input, bool need_weight, bool need_bias,
                          const BelowLayer* below) {
  const at::Tensor grad_out = negation_applied(grad_out_arg), x = negation_applied(x_arg),
                   weight = negation_applied(weight_arg), saved = negation_applied(saved_arg);
  const bool has_dropout = dropout.keep_mask.defined();
  const bool needs_pass = activation != Activation::Identity || has_dropout;
  // Identity without dropout: grad_out already is the pre-activation gradient.
  at::Tensor grad_pre = needs_pass ? at::empty_like(grad_out) : grad_out;
  BackwardPass pass{grad_out, saved, saved_is_output, activation, negative_slope, dropout};

  LayerGrads grads;
#ifdef PYFASTNN_WITH_CUDA
  // CUDA: the bias gradient rides in the weight-gradient GEMM (cuBLASLt's BGRADB epilogue), so the
  // element-wise pass, when there is one, only writes grad_pre.
  if (on_cuda(x) && need_bias && need_weight && cuda::fuses_bias_grad(x, weight.size(0))) {
    if (needs_pass) pass.run(grad_pre, /*need_sums=*/false);
    std::tie(grads.weight, grads.bias) = cuda::weight_and_bias_grad(grad_pre, x);
    if (!grads.bias.defined()) {  // cuBLASLt declined: sum grad_pre's columns ourselves
      grads.bias = BackwardPass{grad_pre, at::Tensor(), false, Activation::Identity, 0.0, {}}.run(at::Tensor(), true);
    }
    if (need_input) input_grad(grads, grad_pre, weight, below);
    return grads;
  }
#endif
  if (need_bias || needs_pass) grads.bias = pass.run(needs_pass ? grad_pre : at::Tensor(), need_bias);
  if (need_input) input_grad(grads, grad_pre, weight, below);
  if (need_weight) grads.weight = matmul_gtx(grad_pre, x);
  return grads;
}

}  // namespace pyfastnn::detail
