// A program that reaches the ops through the dispatcher alone, as TorchScript does, and never names a
// pyfastnn symbol: linking pyfastnn_ops must still load it (and so register torch.ops.pyfastnn.*),
// also where the linker drops libraries a program does not call (--as-needed).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

int main() {
  const auto schema = c10::Dispatcher::singleton().findSchema({"pyfastnn::fused_linear", ""});
  if (!schema.has_value()) {
    std::printf("FAIL: pyfastnn::fused_linear is not registered: the program did not load pyfastnn_ops\n");
    return 1;
  }
  const auto op = schema->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           int64_t, double)>();
  at::manual_seed(0);
  const at::Tensor x = at::randn({5, 4}), w = at::randn({3, 4}), b = at::randn({3});
  const at::Tensor out = op.call(x, w, b, /*relu=*/1, 0.01);
  if (!at::allclose(out, at::relu(at::linear(x, w, b)), 1e-5, 1e-6)) {
    std::printf("FAIL: pyfastnn::fused_linear through the dispatcher differs from relu(linear)\n");
    return 1;
  }
  std::printf("pyfastnn ops registered and called through the dispatcher\n");
  return 0;
}
