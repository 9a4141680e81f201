// C++ tests of the CPU kernels against the ATen reference, and of the activation functors'
// scalar form (what the CUDA kernels run) against their SIMD form (what the CPU kernels run).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <ATen/Version.h>

#include <cctype>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"
#include "dropout.h"
#include "fused_linear.h"
#include "fused_mlp.h"
#include "reference.h"

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
        const bool keep_preact = !pyfastnn::derivative_from_output(act);
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

// The whole-MLP ops (with dropout) against the ATen reference run with the masks they drew.
void test_mlp_against_reference(at::ScalarType dtype, double tol) {
  const int64_t batches[] = {0, 1, 3, 64};
  for (int64_t rows : batches) {
    const auto opts = at::TensorOptions().dtype(dtype);
    const std::vector<int64_t> widths{37, 45, 16, 3};
    std::vector<at::Tensor> weights;
    pyfastnn::BiasList biases;
    for (size_t l = 0; l + 1 < widths.size(); ++l) {
      weights.push_back(at::randn({widths[l + 1], widths[l]}, opts) * (1.0 / std::sqrt(double(widths[l]))));
      biases.push_back(l == 1 ? std::nullopt : std::optional<at::Tensor>(at::randn({widths[l + 1]}, opts)));
    }
    const std::vector<int64_t> activations{5, 3, 0};  // gelu (keeps preact), sigmoid (output), identity
    const std::vector<double> dropout{0.3, 0.5, 0.0};
    at::Tensor x = at::randn({rows, widths[0]}, opts);
    auto [out, hidden, preacts, masks] =
        pyfastnn::fused_mlp_forward(x, weights, biases, activations, 0.01, dropout, /*training=*/true);
    const std::string name = "mlp " + std::string(c10::toString(dtype)) + " rows=" + std::to_string(rows);

    at::Tensor xr = x.to(at::kDouble).requires_grad_();
    std::vector<at::Tensor> wr;
    pyfastnn::BiasList br;
    std::vector<at::Tensor> leaves{xr};
    for (size_t l = 0; l < weights.size(); ++l) {
      wr.push_back(weights[l].to(at::kDouble).requires_grad_());
      leaves.push_back(wr.back());
    }
    for (size_t l = 0; l < weights.size(); ++l) {
      const std::optional<at::Tensor> b = biases.get(l);
      br.push_back(b.has_value() ? std::optional<at::Tensor>(b->to(at::kDouble).requires_grad_()) : std::nullopt);
      if (b.has_value()) leaves.push_back(*br.get(l));
    }
    at::Tensor ref = pyfastnn::reference_fused_mlp(xr, wr, br, activations, 0.01, dropout, masks);
    expect(close(out, ref.detach(), tol), "forward " + name);

    at::Tensor grad = at::randn_like(out);
    auto ref_grads = torch::autograd::grad({ref}, leaves, {grad.to(at::kDouble)});
    c10::List<bool> mask;
    for (int i = 0; i < 7; ++i) mask.push_back(true);
    auto [gx, gws, gbs] = pyfastnn::fused_mlp_backward(grad, x, weights, out, hidden, preacts, masks, activations,
                                                       0.01, dropout, mask);
    expect(close(gx, ref_grads[0], tol), "grad_input " + name);
    for (size_t l = 0; l < 3; ++l) expect(close(gws[l], ref_grads[1 + l], tol), "grad_weight " + name);
    expect(close(gbs[0], ref_grads[4], tol) && close(gbs[2], ref_grads[5], tol), "grad_bias " + name);
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

  // Tensors with no memory behind them reach the kernels only through these direct calls (the
  // dispatcher refuses them): an error, never a write through a null pointer.
  const auto refused = [](const auto& call) {
    try {
      call();
    } catch (const c10::NotImplementedError&) {
      return true;
    }
    return false;
  };
  const auto meta = at::TensorOptions().device(at::kMeta);
  expect(refused([&] { pyfastnn::fused_linear_inference(at::empty({4, 3}, meta), at::empty({2, 3}, meta),
                                                         std::nullopt, 1, 0.01); }),
         "a meta input throws NotImplementedError");
  expect(refused([&] {
           pyfastnn::fused_linear_backward(at::_efficientzerotensor({4, 2}), at::randn({4, 3}), at::randn({2, 3}),
                                           at::randn({4, 2}), 1, 0.01, {true, true, true});
         }),
         "a ZeroTensor gradient throws NotImplementedError");
  // Every tensor a kernel reads, not only the input: named in the message (1-4 rows take the small
  // GEMM, which reads raw memory).
  const auto refusal = [](const auto& call) {
    try {
      call();
    } catch (const c10::NotImplementedError& error) {
      return std::string(error.what_without_backtrace());
    }
    return std::string("no error");
  };
  const auto zeros = [](at::IntArrayRef shape) { return at::_efficientzerotensor(shape); };
  expect(refusal([&] { pyfastnn::fused_linear_inference(at::randn({3, 4}), zeros({5, 4}), std::nullopt, 1, 0.01); })
                 .find("weight is a ZeroTensor") != std::string::npos,
         "a ZeroTensor weight throws NotImplementedError naming it");
  expect(refusal([&] {
           pyfastnn::fused_mlp_inference(at::randn({2, 4}), {at::randn({5, 4}), zeros({3, 5})},
                                         pyfastnn::BiasList({std::nullopt, std::nullopt}), {1, 0}, 0.01, {0.0, 0.0},
                                         false);
         }).find("weights[1] is a ZeroTensor") != std::string::npos,
         "a ZeroTensor weights[1] throws NotImplementedError naming it");
  expect(refusal([&] {
           pyfastnn::fused_linear_backward(at::randn({4, 2}), at::randn({4, 3}), at::randn({2, 3}), zeros({4, 2}), 1,
                                           0.01, {true, true, true});
         }).find("saved activation is a ZeroTensor") != std::string::npos,
         "a ZeroTensor saved activation throws NotImplementedError naming it");
  expect(refusal([&] {
           pyfastnn::fused_linear_inference(at::randn({3, 4}).to_sparse(), at::randn({5, 4}), std::nullopt, 1, 0.01);
         }).find("input has layout torch.sparse_coo") != std::string::npos,
         "a sparse input throws NotImplementedError naming its layout");
  expect(refusal([&] {
           pyfastnn::fused_linear_inference(at::randn({3, 4}), at::randn({5, 4}), at::randn({5}).to_sparse(), 1, 0.01);
         }).find("bias has layout torch.sparse_coo") != std::string::npos,
         "a sparse bias throws NotImplementedError naming it");

  threw = false;
  try {
    pyfastnn::fused_linear_backward(at::Tensor(), at::randn({4, 3}), at::randn({2, 3}), at::randn({4, 2}), 1, 0.01,
                                    {true, true, true});
  } catch (const c10::TypeError& error) {
    threw = std::string(error.what_without_backtrace()).find("grad_output is missing") != std::string::npos;
  }
  expect(threw, "an undefined grad_output throws TypeError naming it");

  // The limit and the value print with the digits that tell them apart (as Python's repr does).
  std::string message;
  try {
    pyfastnn::fused_linear_inference(at::randn({4, 3}), at::randn({2, 3}), std::nullopt,
                                     static_cast<int64_t>(pyfastnn::Activation::LeakyRelu), 3.4028236e38);
  } catch (const c10::ValueError& error) {
    message = error.what_without_backtrace();
  }
  expect(message.find("(at most 3.4028234663852886e+38 in magnitude), got 3.4028236e+38") != std::string::npos,
         "an out-of-range slope's message: " + message);
}

// A lazily negated view reads as the values it stands for, in every tensor a kernel reads (the
// dispatcher resolves such views before its kernels; direct calls do not pass through it).
void test_negated_views_read_as_their_values() {
  for (const int64_t rows : {3, 64}) {  // the small GEMM (raw reads) and ATen's
    const at::Tensor x = at::randn({rows, 4}), w = at::randn({5, 4}), b = at::randn({5}), g = at::randn({rows, 5});
    const auto negated = [](const at::Tensor& t) { return at::_neg_view(-t); };  // contiguous, is_neg()
    const int64_t relu = static_cast<int64_t>(pyfastnn::Activation::Relu);
    const at::Tensor want = pyfastnn::fused_linear_inference(x, w, b, relu, 0.01);
    expect(at::allclose(pyfastnn::fused_linear_inference(negated(x), negated(w), negated(b), relu, 0.01), want),
           "negated views in fused_linear_inference (" + std::to_string(rows) + " rows)");
    const at::Tensor out = want;
    auto [gx, gw, gb] = pyfastnn::fused_linear_backward(g, x, w, out, relu, 0.01, {true, true, true});
    auto [ngx, ngw, ngb] = pyfastnn::fused_linear_backward(negated(g), negated(x), negated(w), negated(out), relu, 0.01,
                                                            {true, true, true});
    expect(at::allclose(ngx, gx) && at::allclose(ngw, gw) && at::allclose(ngb, gb),
           "negated views in fused_linear_backward (" + std::to_string(rows) + " rows)");
  }
}

// Called directly, with parameters that require grad and grad mode on (a torch::nn::Linear's), the
// ops compute like under torch::NoGradGuard: they are kernels, autograd is the dispatcher's business.
void test_direct_calls_with_parameters_that_require_grad() {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const int64_t rows : {2, 64}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      at::Tensor x = at::randn({rows, 16}, opts);
      at::Tensor w = at::randn({8, 16}, opts).requires_grad_();
      at::Tensor b = at::randn({8}, opts).requires_grad_();
      const std::string name = c10::toString(dtype) + std::string(" ") + std::to_string(rows) + " rows";
      at::Tensor expected;
      {
        torch::NoGradGuard no_grad;
        expected = pyfastnn::fused_linear_inference(x, w, b, 1, 0.01);
      }
      try {
        expect(at::equal(pyfastnn::fused_linear_inference(x, w, b, 1, 0.01), expected), "fused_linear " + name);
        const std::vector<at::Tensor> weights{w};
        const pyfastnn::BiasList biases(std::vector<std::optional<at::Tensor>>{b});
        const std::vector<int64_t> activations{1};
        const std::vector<double> dropout{0.0};
        expect(at::equal(pyfastnn::fused_mlp_inference(x, weights, biases, activations, 0.01, dropout, false),
                         expected),
               "fused_mlp " + name);
      } catch (const c10::Error& error) {
        expect(false, "direct call with parameters that require grad, " + name + ": " + error.what_without_backtrace());
      }
    }
  }
}

// A missing dropout mask is an error, not a layer without dropout.
void test_missing_keep_mask_throws() {
  at::manual_seed(1);
  at::Tensor x = at::randn({6, 5});
  const std::vector<at::Tensor> weights{at::randn({4, 5}), at::randn({3, 4})};
  const pyfastnn::BiasList biases(std::vector<std::optional<at::Tensor>>{std::nullopt, std::nullopt});
  const std::vector<int64_t> activations{1, 0};
  const std::vector<double> dropout{0.5, 0.0};
  auto [out, hidden, preacts, masks] =
      pyfastnn::fused_mlp_forward(x, weights, biases, activations, 0.01, dropout, true);
  masks[0] = at::Tensor();
  bool threw = false;
  try {
    pyfastnn::fused_mlp_backward(at::ones_like(out), x, weights, out, hidden, preacts, masks, activations, 0.01,
                                 dropout, c10::List<bool>({true, true, true, false, false}));
  } catch (const c10::TypeError& error) {
    threw = std::string(error.what_without_backtrace()).find("keep_masks[0] is missing") != std::string::npos;
  }
  expect(threw, "an undefined keep mask throws TypeError naming it");
}

// The message of the c10::Error a call throws, prefixed by "TypeError: " / "ValueError: " where it
// is one ("no error" if none): any other error is reported by expect(), never aborts the test.
template <typename Call>
std::string error_of(const Call& call) {
  try {
    call();
  } catch (const c10::TypeError& error) {
    return std::string("TypeError: ") + error.what_without_backtrace();
  } catch (const c10::ValueError& error) {
    return std::string("ValueError: ") + error.what_without_backtrace();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  }
  return "no error";
}

// Through the dispatcher with autograd: a missing tensor is named by the op's own check, not by
// autograd's "tensor does not have a device".
void test_missing_tensors_are_named_under_autograd() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("pyfastnn::fused_linear", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        int64_t, double)>();
  std::string message = error_of([&] { op.call(at::randn({4, 3}).requires_grad_(), at::Tensor(), std::nullopt, 1, 0.0); });
  expect(message.find("TypeError: pyfastnn: weight must be a tensor, not None") == 0,
         "an undefined weight under autograd throws TypeError naming it: " + message);
  const auto mlp = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pyfastnn::fused_mlp", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, const pyfastnn::BiasList&,
                                         at::IntArrayRef, double, at::ArrayRef<double>, bool)>();
  message = error_of([&] {
    mlp.call(at::randn({2, 4}).requires_grad_(), {at::randn({5, 4}), at::Tensor()},
             pyfastnn::BiasList({std::nullopt, std::nullopt}), {1, 0}, 0.01, {0.0, 0.0}, false);
  });
  expect(message.find("TypeError: ") == 0 && message.find("weights[1]") != std::string::npos,
         "an undefined weights[1] under autograd throws TypeError naming it: " + message);
}

// A dropout mask with probability 0 can come from no forward; the CPU reads no relu bit mask, so
// a pre-activation slot holding something else is no error there.
void test_backward_masks_and_slots() {
  at::manual_seed(2);
  const at::Tensor x = at::randn({4, 3});
  const std::vector<at::Tensor> weights{at::randn({5, 3}), at::randn({2, 5})};
  const pyfastnn::BiasList biases(std::vector<std::optional<at::Tensor>>{std::nullopt, std::nullopt});
  const std::vector<int64_t> activations{1, 0};
  const c10::List<bool> mask({true, true, true, false, false});
  auto [out, hidden, preacts, masks] =
      pyfastnn::fused_mlp_forward(x, weights, biases, activations, 0.0, {0.5, 0.0}, true);
  const std::string message = error_of([&] {
    pyfastnn::fused_mlp_backward(at::ones_like(out), x, weights, out, hidden, preacts, masks, activations, 0.0,
                                 {0.0, 0.0}, mask);
  });
  expect(message.find("ValueError: pyfastnn: keep_masks[0] is a dropout mask, but dropout[0] is 0") == 0,
         "a mask with dropout 0 throws ValueError naming it: " + message);
  const auto expected =
      pyfastnn::fused_mlp_backward(at::ones_like(out), x, weights, out, hidden, preacts, masks, activations, 0.0,
                                   {0.5, 0.0}, mask);
  std::vector<at::Tensor> float_preacts{at::randn({4, 5}), preacts[1]};
  const auto got =
      pyfastnn::fused_mlp_backward(at::ones_like(out), x, weights, out, hidden, float_preacts, masks, activations,
                                   0.0, {0.5, 0.0}, mask);
  expect(at::equal(std::get<0>(got), std::get<0>(expected)), "the CPU reads no relu bit mask from preacts[0]");
}

// The CPU capabilities this CPU supports, as ATen names them (ATen asks the same features of each).
std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> supported{"DEFAULT"};
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) supported.push_back("AVX2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    supported.push_back("AVX512");
  }
#endif
  return supported;
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Every kernel copy the CPU can run is in the build (a compiler that silently drops one fails
// here), and the one in use is ATen's choice.
void test_kernel_variants(const std::vector<std::string>& supported) {
  std::vector<std::string> compiled;
  std::istringstream words(pyfastnn::cpu::compiled_isas());
  for (std::string word; words >> word;) compiled.push_back(word);
  for (const auto& capability : supported) {
    expect(contains(compiled, capability), "the CPU supports " + capability + " but the build has no " + capability +
                                               " kernels (compiled: " + pyfastnn::cpu::compiled_isas() + ")");
  }
  const std::string aten = at::get_cpu_capability();
  const std::string in_use = pyfastnn::cpu::epilogue_kernels().isa;
  std::string expected = "DEFAULT";
  if (contains(compiled, aten)) {
    expected = aten;
  } else if (aten == "AVX512" && contains(compiled, "AVX2")) {
    expected = "AVX2";
  }
  expect(in_use == expected, "kernels in use " + in_use + ", expected " + expected + " (ATen: " + aten + ")");
  const std::string small_gemm_in_use = pyfastnn::cpu::small_gemm_kernels().isa;
  expect(small_gemm_in_use == expected,
         "small GEMM kernels in use " + small_gemm_in_use + ", expected " + expected + " (ATen: " + aten + ")");
  std::printf("CPU kernels compiled: %s; in use: %s (ATen capability %s)\n", pyfastnn::cpu::compiled_isas(),
              in_use.c_str(), aten.c_str());
}

// CUDA dropout's Philox4x32-10 (dropout.h, host and device code alike) against the known-answer
// vectors of its reference implementation (Random123), and its keep() against its definition.
void test_philox_known_answers() {
  struct Vector { uint64_t low, high, key; uint32_t expected[4]; };
  const Vector vectors[] = {
      {0, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {~0ull, ~0ull, ~0ull, {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {0x85a308d3243f6a88ull, 0x0370734413198a2eull, 0x299f31d0a4093822ull,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& v : vectors) {
    const pyfastnn::Philox4x32 draws = pyfastnn::Philox4x32::generate(v.low, v.high, v.key);
    expect(std::equal(draws.word, draws.word + 4, v.expected), "Philox4x32-10 known answer");
  }
  const pyfastnn::PhiloxDropout stream{12345, 8, pyfastnn::dropout_threshold(0.5)};
  for (int64_t e = 0; e < 64; ++e) {
    const auto draw = pyfastnn::Philox4x32::generate(8 / 4, static_cast<uint64_t>(e) / 4, 12345).word[e % 4];
    expect(stream.keep(e) == (draw >= stream.threshold),
           "PhiloxDropout::keep reads word e % 4 of counter {offset / 4, e / 4}");
  }
}

}  // namespace

// The test runs once per kernel copy (ctest sets ATEN_CPU_CAPABILITY). ATen trusts that variable
// without asking the CPU, so a capability this CPU lacks is skipped (exit code 77) before any op runs.
int main() {
  const auto supported = supported_cpu_capabilities();
  if (const char* requested = std::getenv("ATEN_CPU_CAPABILITY")) {
    std::string upper(requested);
    std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
    if (!contains(supported, upper)) {
      std::printf("skipped: this CPU cannot run the %s kernels\n", upper.c_str());
      return 77;
    }
  }
  test_kernel_variants(supported);
  at::manual_seed(0);
  test_against_reference(at::kFloat, 1e-4);
  test_against_reference(at::kDouble, 1e-10);
  test_against_reference(at::kBFloat16, 3e-2);
  test_mlp_against_reference(at::kFloat, 1e-4);
  test_mlp_against_reference(at::kDouble, 1e-10);
  test_scalar_matches_vectorized();
  test_bad_arguments_throw();
  test_negated_views_read_as_their_values();
  test_direct_calls_with_parameters_that_require_grad();
  test_missing_keep_mask_throws();
  test_missing_tensors_are_named_under_autograd();
  test_backward_masks_and_slots();
  test_philox_known_answers();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all C++ fused_linear tests passed\n");
  return 0;
}
