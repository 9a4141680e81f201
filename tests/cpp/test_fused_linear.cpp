// C++ tests of the CPU kernels against the ATen reference, and of the activation functors'
// scalar form (what the CUDA kernels run) against their SIMD form (what the CPU kernels run).
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <string>

#include "cpu/vec_math.h"
#include "fused_linear.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Max absolute error within tol of the reference's own scale (bfloat16 sums round per product).
bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  const at::Tensor expected = b.to(at::kDouble);
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  return (a.to(at::kDouble) - expected).abs().max().item<double>() <= tol * scale;
}

void test_against_reference(at::ScalarType dtype, double tol) {
  const int64_t shapes[][3] = {{0, 5, 3}, {1, 784, 256}, {3, 5, 7}, {64, 784, 256}, {33, 17, 45}};
  for (const auto& s : shapes) {
    for (int64_t code = 0; code < pyfastnn::kNumActivations; ++code) {
      for (double slope : {0.01, -0.2}) {
        const auto opts = at::TensorOptions().dtype(dtype);
        at::Tensor x = at::randn({s[0], s[1]}, opts);
        at::Tensor w = at::randn({s[2], s[1]}, opts) * (1.0 / std::sqrt(double(s[1])));
        at::Tensor b = at::randn({s[2]}, opts);
        const auto act = static_cast<pyfastnn::Activation>(code);
        const bool keep_preact = !pyfastnn::derivative_from_output(act, slope);
        auto [out, preact] = pyfastnn::fused_linear_forward(x, w, b, code, slope, keep_preact);

        // Reference forward and gradients from ATen's autograd.
        at::Tensor xr = x.detach().to(at::kDouble).requires_grad_();
        at::Tensor wr = w.detach().to(at::kDouble).requires_grad_();
        at::Tensor br = b.detach().to(at::kDouble).requires_grad_();
        at::Tensor ref = pyfastnn::reference_fused_linear(xr, wr, br, code, slope);
        const std::string name = std::string(pyfastnn::kActivationNames[code]) + " " +
                                 c10::toString(dtype) + " " + std::to_string(s[0]) + "x" +
                                 std::to_string(s[1]) + "->" + std::to_string(s[2]);
        expect(close(out, ref.detach(), tol), "forward " + name);

        at::Tensor grad = at::randn_like(out);
        auto ref_grads = torch::autograd::grad({ref}, {xr, wr, br}, {grad.to(at::kDouble)});
        auto [gx, gw, gb] = pyfastnn::fused_linear_backward(grad, x, w, keep_preact ? preact : out,
                                                                code, slope, {true, true, true});
        expect(close(gx, ref_grads[0], tol), "grad_input " + name);
        expect(close(gw, ref_grads[1], tol), "grad_weight " + name);
        expect(close(gb, ref_grads[2], tol), "grad_bias " + name);
      }
    }
  }
}

// The functors must give the same numbers in scalar form (CUDA, tails) and SIMD form (CPU).
void test_scalar_matches_vectorized() {
  using Vec = at::vec::Vectorized<float>;
  for (int64_t code = 0; code < pyfastnn::kNumActivations; ++code) {
    pyfastnn::visit_activation(static_cast<pyfastnn::Activation>(code), [&](auto functor) {
      using F = decltype(functor);
      float xs[Vec::size()];
      for (float start = -8.0f; start < 8.0f; start += 0.37f * Vec::size()) {
        for (int i = 0; i < Vec::size(); ++i) xs[i] = start + 0.37f * i;
        float fwd[Vec::size()], der[Vec::size()];
        F::forward(Vec::loadu(xs), Vec(0.1f)).store(fwd);
        F::derivative(Vec::loadu(xs), Vec(0.1f)).store(der);
        for (int i = 0; i < Vec::size(); ++i) {
          const float f = F::forward(xs[i], 0.1f), d = F::derivative(xs[i], 0.1f);
          expect(std::fabs(f - fwd[i]) <= 1e-5f * (1.0f + std::fabs(f)),
                 std::string("scalar vs SIMD forward ") + pyfastnn::kActivationNames[code]);
          expect(std::fabs(d - der[i]) <= 1e-5f * (1.0f + std::fabs(d)),
                 std::string("scalar vs SIMD derivative ") + pyfastnn::kActivationNames[code]);
        }
      }
    });
  }
}

void test_bad_arguments_throw() {
  bool threw = false;
  try {
    pyfastnn::fused_linear_forward(at::randn({2, 3}), at::randn({4, 5}), std::nullopt, 1, 0.0, false);
  } catch (const c10::ValueError&) {
    threw = true;
  }
  expect(threw, "wrong in_features throws ValueError");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_against_reference(at::kFloat, 1e-4);
  test_against_reference(at::kDouble, 1e-10);
  test_against_reference(at::kBFloat16, 3e-2);
  test_scalar_matches_vectorized();
  test_bad_arguments_throw();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all C++ fused_linear tests passed\n");
  return 0;
}
