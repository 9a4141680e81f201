// The lesson's XOR net (2 -> 8 -> 1, tanh then sigmoid) trained from C++: libtorch's autograd and Adam
// through the pyfastnn::fused_mlp op (one fused op each way, as torch.ops.pyfastnn.fused_mlp in
// Python), then run once more with the C++ API's kernel call, which skips autograd. Both are checked
// against libtorch's own layers; the program fails (exit 1) where anything disagrees.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>
#include <vector>

#include "activations.h"
#include "fused_mlp.h"

namespace {

constexpr auto kTanh = static_cast<int64_t>(pyfastnn::Activation::Tanh);
constexpr auto kSigmoid = static_cast<int64_t>(pyfastnn::Activation::Sigmoid);

}  // namespace

int main() {
  torch::manual_seed(0);
  const torch::Tensor x = torch::tensor({{0.f, 0.f}, {0.f, 1.f}, {1.f, 0.f}, {1.f, 1.f}});
  const torch::Tensor y = torch::tensor({{0.f}, {1.f}, {1.f}, {0.f}});
  torch::nn::Linear hidden(2, 8), output(8, 1);

  // The op with its autograd and autocast kernels, found by name in the dispatcher.
  const auto fused_mlp =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastnn::fused_mlp", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, const pyfastnn::BiasList&, at::IntArrayRef, double,
                            at::ArrayRef<double>, bool)>();
  // The layers' own parameters (Adam updates them in place), as the ops take them.
  const std::vector<at::Tensor> weights{hidden->weight, output->weight};
  const pyfastnn::BiasList biases(std::vector<std::optional<at::Tensor>>{hidden->bias, output->bias});
  const std::vector<int64_t> activations{kTanh, kSigmoid};
  const std::vector<double> no_dropout{0.0, 0.0};
  const auto forward = [&] { return fused_mlp.call(x, weights, biases, activations, 0.0, no_dropout, true); };

  std::vector<torch::Tensor> parameters = hidden->parameters();
  for (const auto& p : output->parameters()) parameters.push_back(p);
  torch::optim::Adam optimizer(parameters, torch::optim::AdamOptions(0.05));
  float loss_value = 0.f;
  for (int step = 0; step < 500; ++step) {
    optimizer.zero_grad();
    const torch::Tensor loss = torch::binary_cross_entropy(forward(), y);
    loss.backward();
    optimizer.step();
    loss_value = loss.item<float>();
  }

  torch::NoGradGuard no_grad;
  const torch::Tensor fused = forward();
  const torch::Tensor eager = torch::sigmoid(output(torch::tanh(hidden(x))));
  const torch::Tensor kernel = pyfastnn::fused_mlp_inference(x, weights, biases, activations, 0.0, no_dropout, false);
  for (int64_t i = 0; i < x.size(0); ++i) {
    std::printf("%g xor %g -> %.4f\n", x[i][0].item<float>(), x[i][1].item<float>(), fused[i][0].item<float>());
  }
  std::printf("loss after 500 Adam steps: %.5f\n", loss_value);

  bool ok = true;
  const auto expect = [&ok](bool condition, const char* what) {
    if (!condition) std::printf("FAIL: %s\n", what);
    ok = ok && condition;
  };
  expect(loss_value < 0.05f, "the XOR net learned XOR (loss < 0.05)");
  expect(torch::equal(fused.round(), y), "every prediction rounds to its XOR");
  expect(torch::allclose(fused, eager, 1e-5, 1e-6), "pyfastnn::fused_mlp agrees with libtorch's layers");
  expect(torch::equal(kernel, fused), "the C++ API's kernel call agrees with the dispatcher's op");
  return ok ? 0 : 1;
}
