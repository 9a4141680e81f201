// The Autograd kernels (autograd.h). Each op's kernel picks one of three paths: inference (no graph:
// straight to the device kernel), the fused autograd Function (forward keeps what backward needs,
// backward is one more fused op), or the ATen reference where autograd needs derivatives the fused
// backward does not give (NOTE [Forward-mode AD and torch.func], create_graph=True).
#include "autograd.h"

#include <ATen/FuncTorchTLS.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <torch/autograd.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "activations.h"
#include "checks.h"
#include "dropout.h"
#include "reference.h"
#include "registration.h"

namespace pyfastnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// NOTE [Forward-mode AD and torch.func]
// A C++ autograd::Function has no forward (JVP) formula: dual tensors passing through it would
// come out with zero tangents. And torch.func's transforms (grad, vjp, jacrev, vmap, ...) refuse
// C++ autograd Functions outright. So when any argument carries a forward-mode tangent
// (torch.func.jvp, jacfwd, torch.autograd.forward_ad) or a torch.func transform is active, the
// autograd kernels run the ATen reference instead (the composite that double backward
// differentiates): its ops have forward derivatives and functorch rules, so the tangent is exact,
// act'(pre) * (dx W^T + x dW^T + db) layer by layer, and every transform composes. With dropout
// active, fused_mlp first runs its own forward for the masks, so the values equal the fused path's.
// Backward does the same where the incoming gradient carries a tangent (backward_through_reference).
bool has_forward_grad(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_forward_grad(const std::optional<at::Tensor>& t) { return t.has_value() && has_forward_grad(*t); }
// Asks functorch the very question autograd::Function::apply asks it (it throws inside a transform).
bool in_functorch_transform() {
  const auto& functorch_tls = at::functorch::functorchTLSAccessor();
  if (!functorch_tls) return false;  // functorch never used on this thread
  try {
    functorch_tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// NOTE [Save only what backward reads]
// Backward reads a layer's output only where the derivative comes from it (derivative_from_output:
// relu, sigmoid, tanh, as for torch's); identity needs neither output nor pre-activation. Saving
// the output anyway would make autograd refuse in-place ops on it (`y += x` after nn.Linear,
// F.gelu or F.leaky_relu is legal), so an empty placeholder is saved in its place (the backward
// ops do not read it).
at::Tensor saved_if_read(bool read, const at::Tensor& tensor) {
  return read ? tensor : at::empty({0}, tensor.options());
}

// Whether backward must differentiate the ATen reference rather than run the fused backward op: under
// backward(create_graph=True), so that higher-order gradients are exact rather than silently missing;
// where the incoming gradient carries a forward-mode tangent (forward-over-reverse, a dual
// grad_output), which the backward ops, with no derivative of their own, would drop (NOTE
// [Forward-mode AD and torch.func]); and where it is batched (torch.func.vmap of a vjp,
// autograd.grad(is_grads_batched=True)), which the backward ops have no batching rules for.
bool backward_through_reference(const at::Tensor& grad_output) {
  return at::GradMode::is_enabled() || has_forward_grad(grad_output) || at::isBatchedTensor(grad_output) ||
         in_functorch_transform();
}

// Inside torch.func.jvp no reverse-mode graph is recorded, so a recomputed forward there has nothing
// to differentiate (a graph built outside the transform, differentiated inside it).
void check_recomputed(const at::Tensor& out) {
  TORCH_CHECK_NOT_IMPLEMENTED(out.requires_grad(),
                              "pyfastnn: the backward of a fused op cannot run inside torch.func.jvp when the graph "
                              "was built outside it (jvp records no graph of the recomputed layers); build it inside "
                              "(torch.func.jvp of torch.func.vjp) or pass the tangent with torch.autograd.forward_ad");
}

// A sparse incoming gradient (`y.backward(sparse_grad)`) stands for its dense tensor, as eager
// F.linear's backward reads it; the backward ops read strided memory only.
at::Tensor strided_gradient(const at::Tensor& grad) {
  return grad.defined() && grad.layout() != at::kStrided ? grad.to_dense() : grad;
}

// NOTE [Each slot its own derivative]
// The reference backward recomputes the op from the saved tensors and differentiates it. But a
// slot's tensor may reach another slot's through its own history: one tensor in several slots
// (tied layers: fused_mlp(x, [W, W]), fused_linear(W, W)), a layer applied to what it made itself
// (fused_linear(fused_linear(x, W), W)), a weight computed from the input (a hypernetwork). Asked
// for the tensor itself, autograd::grad would follow those paths too and give its total
// derivative, which the engine then counts again through the other slots and nodes. So the op is
// recomputed from a view of each slot's tensor, its own, and differentiated with respect to those
// views: each slot gets its own partial derivative, as from the fused backward, and the views
// lead back to the tensors for higher orders.
at::Tensor own_view(const at::Tensor& t) { return t.defined() ? t.view_as(t) : t; }

// The gradients of `out` for the views in `slots` (undefined: not wanted), slot by slot.
variable_list reference_gradients(const at::Tensor& out, const at::Tensor& grad_output, const variable_list& slots,
                                  bool create_graph) {
  variable_list result(slots.size());
  variable_list wanted;
  for (const auto& slot : slots) {
    if (slot.defined()) wanted.push_back(slot);
  }
  if (wanted.empty()) return result;
  check_recomputed(out);
  const auto grads = torch::autograd::grad({out}, wanted, {grad_output}, /*retain_graph=*/true, create_graph,
                                           /*allow_unused=*/true);
  for (size_t i = 0, k = 0; i < slots.size(); ++i) {
    if (slots[i].defined()) result[i] = grads[k++];
  }
  return result;
}

class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t activation,
                            double negative_slope) {
    // Keep only what the derivative needs: the output (returned anyway, so free) or the pre-activation.
    const auto act = static_cast<Activation>(activation);
    const bool from_output = derivative_from_output(act);
    at::Tensor output, preact;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, preact) =
          ops::fused_linear_forward_op().call(input, weight, bias, activation, negative_slope, !from_output);
    }
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = has_tensor(bias);
    ctx->save_for_backward({input, weight, saved_if_read(reads_saved_tensor(act), from_output ? output : preact),
                            has_tensor(bias) ? *bias : at::Tensor()});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor grad_output = strided_gradient(grad_outputs[0]);
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2])) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (backward_through_reference(grad_output)) {
      // Recomputed from views of the saved input, weight and bias, which keep their history, so
      // the gradients link to all they depend on (NOTE [Each slot its own derivative]).
      const bool create_graph = at::GradMode::is_enabled();
      const at::AutoGradMode record(true);  // the recomputed forward records its graph in any case
      const at::Tensor input_view = own_view(input), weight_view = own_view(weight);
      std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(own_view(saved[3])) : std::nullopt;
      const at::Tensor out = reference_fused_linear(input_view, weight_view, bias, activation, negative_slope);
      variable_list slots{mask[0] ? input_view : at::Tensor(), mask[1] ? weight_view : at::Tensor(),
                          mask[2] ? *bias : at::Tensor()};
      auto result = reference_gradients(out, grad_output, slots, create_graph);
      result.resize(5);  // and none for activation, negative_slope
      return result;
    }
    auto [grad_input, grad_weight, grad_bias] = ops::fused_linear_backward_op().call(
        grad_output, input, weight, saved[2], activation, negative_slope, mask);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor()};
  }
};

// Autograd sees input, every weight and every present bias as inputs of ONE node; the bias list
// itself (with its Nones) travels as a non-differentiable argument for the op call.
class FusedMLPFunction : public torch::autograd::Function<FusedMLPFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, at::TensorList weights,
                            at::TensorList present_biases, const BiasList& biases, at::IntArrayRef activations,
                            double negative_slope, at::ArrayRef<double> dropout, bool training) {
    at::Tensor output;
    std::vector<at::Tensor> hidden, preacts, keep_masks;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, hidden, preacts, keep_masks) =
          ops::fused_mlp_forward_op().call(input, weights, biases, activations, negative_slope, dropout, training);
    }
    c10::List<bool> has_bias;
    for (size_t l = 0; l < biases.size(); ++l) has_bias.push_back(has_tensor(biases.get(l)));
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["activations"] = activations.vec();
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["dropout"] = dropout.vec();
    // The output layer's derivative reads the output or its saved pre-activation (gelu, silu, leaky_relu).
    const auto output_activation = static_cast<Activation>(activations.back());
    variable_list to_save{input, saved_if_read(reads_saved_tensor(output_activation) &&
                                                   derivative_from_output(output_activation),
                                               output)};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), present_biases.begin(), present_biases.end());
    to_save.insert(to_save.end(), hidden.begin(), hidden.end());
    to_save.insert(to_save.end(), preacts.begin(), preacts.end());
    to_save.insert(to_save.end(), keep_masks.begin(), keep_masks.end());
    ctx->save_for_backward(to_save);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto has_bias = ctx->saved_data["has_bias"].toBoolList();
    const auto activations = ctx->saved_data["activations"].toIntVector();
    const int64_t layers = static_cast<int64_t>(activations.size());
    int64_t bias_count = 0;
    for (int64_t l = 0; l < layers; ++l) bias_count += has_bias.get(l);
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const auto dropout = ctx->saved_data["dropout"].toDoubleVector();
    // Saved layout: input, output, weights[L], present biases[P], hidden[L-1], preacts[L], masks[L].
    const at::Tensor& input = saved[0];
    const at::Tensor& output = saved[1];
    auto slice = [&](int64_t begin, int64_t count) {
      return std::vector<at::Tensor>(saved.begin() + begin, saved.begin() + begin + count);
    };
    const auto weights = slice(2, layers);
    const auto present_biases = slice(2 + layers, bias_count);
    const auto hidden = slice(2 + layers + bias_count, layers - 1);
    const auto preacts = slice(1 + 2 * layers + bias_count, layers);
    const auto keep_masks = slice(1 + 3 * layers + bias_count, layers);

    // Variable inputs, in order: input, weights, present biases.
    c10::List<bool> mask;
    mask.push_back(ctx->needs_input_grad(0));
    for (int64_t l = 0; l < layers; ++l) mask.push_back(ctx->needs_input_grad(1 + l));
    for (int64_t l = 0, b = 0; l < layers; ++l) {
      mask.push_back(has_bias.get(l) && ctx->needs_input_grad(1 + layers + b++));
    }

    const size_t variable_inputs = 1 + layers + bias_count;
    variable_list result(variable_inputs + 5);  // + biases list, activations, slope, dropout, training
    const at::Tensor grad_output = strided_gradient(grad_outputs[0]);
    if (!grad_output.defined()) return result;

    if (backward_through_reference(grad_output)) {
      // The ATen reference with the same masks, recomputed from views of the saved tensors (NOTE
      // [Each slot its own derivative]).
      const bool create_graph = at::GradMode::is_enabled();
      const at::AutoGradMode record(true);  // the recomputed forward records its graph in any case
      variable_list views{own_view(input)};  // input, weights, present biases: the variable inputs' order
      for (const auto& weight : weights) views.push_back(own_view(weight));
      for (const auto& bias : present_biases) views.push_back(own_view(bias));
      const std::vector<at::Tensor> weight_views(views.begin() + 1, views.begin() + 1 + layers);
      BiasList biases;
      for (int64_t l = 0, b = 0; l < layers; ++l) {
        biases.push_back(has_bias.get(l) ? std::optional<at::Tensor>(views[1 + layers + b++]) : std::nullopt);
      }
      const at::Tensor out =
          reference_fused_mlp(views[0], weight_views, biases, activations, negative_slope, dropout, keep_masks);
      variable_list slots(views);
      for (size_t i = 0; i < variable_inputs; ++i) {
        if (!ctx->needs_input_grad(i)) slots[i] = at::Tensor();
      }
      auto grads = reference_gradients(out, grad_output, slots, create_graph);
      std::copy(grads.begin(), grads.end(), result.begin());
      return result;
    }

    auto [grad_input, grad_weights, grad_biases] = ops::fused_mlp_backward_op().call(
        grad_output, input, weights, output, hidden, preacts, keep_masks, activations, negative_slope, dropout, mask);
    if (mask.get(0)) result[0] = grad_input;
    for (int64_t l = 0, b = 0; l < layers; ++l) {
      if (mask.get(1 + l)) result[1 + l] = grad_weights[l];
      if (has_bias.get(l)) {
        if (mask.get(1 + layers + l)) result[1 + layers + b] = grad_biases[l];
        ++b;
      }
    }
    return result;
  }
};

}  // namespace

at::Tensor fused_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t activation,
                                 double negative_slope) {
  if (has_forward_grad(input) || has_forward_grad(weight) || has_forward_grad(bias) || in_functorch_transform()) {
    // See NOTE [Forward-mode AD and torch.func].
    check_fused_linear_args(input, weight, bias, activation, negative_slope);
    return reference_fused_linear(input, weight, bias, activation, negative_slope);
  }
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (input.requires_grad() || weight.requires_grad() ||
                            (has_tensor(bias) && bias->requires_grad()));
  if (!needs_graph) {
    // Inference: no graph node, no saved tensors, no pre-activation; one GEMM and one epilogue.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::fused_linear_op().call(input, weight, bias, activation, negative_slope);
  }
  // Before apply: autograd reads every tensor argument (an undefined one: "tensor does not have a
  // device") before the kernel's checks would name it. A nested tensor first: it has no sizes to check.
  if (input.is_nested() || weight.is_nested()) check_readable_args(input, weight, bias);
  check_fused_linear_args(input, weight, bias, activation, negative_slope);
  return FusedLinearFunction::apply(input, weight, bias, activation, negative_slope);
}

at::Tensor fused_mlp_autograd(const at::Tensor& input, at::TensorList weights, const BiasList& biases,
                              at::IntArrayRef activations, double negative_slope, at::ArrayRef<double> dropout,
                              bool training) {
  bool use_reference = has_forward_grad(input) || in_functorch_transform();
  for (const auto& w : weights) use_reference = use_reference || has_forward_grad(w);
  for (size_t l = 0; l < biases.size(); ++l) use_reference = use_reference || has_forward_grad(biases.get(l));
  if (use_reference) {
    // See NOTE [Forward-mode AD and torch.func]. The masks come from the fused forward (same draws).
    check_fused_mlp_args(input, weights, biases, activations, negative_slope, dropout);
    std::vector<at::Tensor> keep_masks;
    if (std::any_of(dropout.begin(), dropout.end(), [&](double p) { return dropout_runs(p, training); })) {
      // Only the masks are wanted: detached, so that no transform's autograd meets the forward's
      // out= GEMMs (torch.func.grad / jvp track the arguments even below the Autograd key).
      std::vector<at::Tensor> plain_weights;
      for (const auto& w : weights) plain_weights.push_back(w.detach());
      BiasList plain_biases;
      for (size_t l = 0; l < biases.size(); ++l) {
        const std::optional<at::Tensor> b = biases.get(l);
        plain_biases.push_back(has_tensor(b) ? std::optional<at::Tensor>(b->detach()) : std::nullopt);
      }
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      keep_masks = std::get<3>(ops::fused_mlp_forward_op().call(input.detach(), plain_weights, plain_biases,
                                                                activations, negative_slope, dropout, training));
    }
    return reference_fused_mlp(input, weights, biases, activations, negative_slope, dropout, keep_masks);
  }
  std::vector<at::Tensor> present_biases;
  bool any_requires_grad = input.requires_grad();
  for (const auto& w : weights) any_requires_grad = any_requires_grad || w.requires_grad();
  for (size_t l = 0; l < biases.size(); ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    if (has_tensor(b)) {
      present_biases.push_back(*b);
      any_requires_grad = any_requires_grad || b->requires_grad();
    }
  }
  if (!(at::GradMode::is_enabled() && any_requires_grad)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::fused_mlp_op().call(input, weights, biases, activations, negative_slope, dropout, training);
  }
  const auto nested = [](const at::Tensor& t) { return t.is_nested(); };
  if (nested(input) || std::any_of(weights.begin(), weights.end(), nested)) {
    check_readable_args(input, weights, &biases);  // as fused_linear's, above
  }
  check_fused_mlp_args(input, weights, biases, activations, negative_slope, dropout);
  return FusedMLPFunction::apply(input, weights, at::TensorList(present_biases), biases, activations,
                                 negative_slope, dropout, training);
}

}  // namespace pyfastnn
