// The activation table: one enum and one functor per activation, forward and derivative.
//
// Every kernel (CPU scalar and vectorized, CUDA) instantiates these same templates, so the
// formulas exist exactly once. A functor is written against `MathOps<T>`, a tiny policy that
// supplies exp/tanh/erf and a branch-free select for the value type T: plain float/double here
// (usable from host and device code), at::vec::Vectorized<...> in cpu/vec_math.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYFASTNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYFASTNN_HOST_DEVICE inline
#endif

namespace pyfastnn {

// Order and spelling are the Python API's: pyfastnn.ACTIVATIONS is read from kActivationNames.
enum class Activation : int64_t {
  Identity = 0,
  Relu = 1,
  LeakyRelu = 2,
  Sigmoid = 3,
  Tanh = 4,
  Gelu = 5,      // x * Phi(x), erf form (F.gelu default)
  GeluTanh = 6,  // tanh approximation (F.gelu(approximate="tanh"))
  Silu = 7,  // the last: kNumActivations counts up to it
};

constexpr int64_t kNumActivations = static_cast<int64_t>(Activation::Silu) + 1;
constexpr const char* kActivationNames[] = {
    "identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"};
static_assert(sizeof(kActivationNames) / sizeof(kActivationNames[0]) == kNumActivations,
              "one name per activation, in the enum's order");

inline bool is_valid_activation(int64_t code) {
  return code >= 0 && code < kNumActivations;
}

// Whether backward reads a saved tensor (the output or the pre-activation) at all: every activation
// but identity, whose derivative is 1.
PYFASTNN_HOST_DEVICE bool reads_saved_tensor(Activation act) { return act != Activation::Identity; }

// Whether backward takes the derivative from the activation's output (so the output, which the
// caller keeps anyway, is all that must be saved) or from the pre-activation, for an output the
// caller receives: as torch's own activations do, so that the same in-place ops on it are legal.
// leaky_relu keeps its pre-activation like torch's.
PYFASTNN_HOST_DEVICE bool derivative_from_output(Activation act) {
  switch (act) {
    case Activation::Identity:
    case Activation::Relu:
    case Activation::Sigmoid:
    case Activation::Tanh:
      return true;
    default:
      return false;
  }
}

// The same for any layer: a hidden layer of fused_mlp, whose output only the layer above reads,
// derives from its output wherever that output determines the derivative, so that its
// pre-activation is never kept: also leaky_relu with a slope >= 0 (y > 0 exactly where x > 0; a
// negative slope maps both signs to positive outputs).
PYFASTNN_HOST_DEVICE bool derivative_from_output(Activation act, double negative_slope, bool hidden_layer) {
  return derivative_from_output(act) || (hidden_layer && act == Activation::LeakyRelu && negative_slope >= 0.0);
}

// Whether act'(s) depends only on whether s > 0 (relu, leaky_relu; identity on nothing), so that a
// saved output that went through dropout gives it at its kept scale y / (1 - p) as well: backward
// does not scale it back, which could round a tiny positive value down to a denormal that a CPU
// flushing denormals reads as 0 (the other side).
PYFASTNN_HOST_DEVICE bool derivative_reads_positivity_only(Activation act) {
  return act == Activation::Identity || act == Activation::Relu || act == Activation::LeakyRelu;
}

// Whether act'(y) is 0 wherever the output y is exactly 0 (relu: y = 0 means x <= 0; sigmoid's
// output is never 0 otherwise). After dropout, the saved output then already says where the gradient
// vanishes, so backward can scale by 1 / (1 - p) without reading the mask. (A dropped relu output of
// inf is saved as inf * 0 = NaN, where relu passes no gradient either: Relu::active.)
PYFASTNN_HOST_DEVICE bool derivative_vanishes_at_zero_output(Activation act) {
  return act == Activation::Relu || act == Activation::Sigmoid;
}

// Scalar math policy (float or double), usable from host and device code.
template <typename T>
struct MathOps {
  using Mask = bool;
  PYFASTNN_HOST_DEVICE static T constant(double v) { return static_cast<T>(v); }
  PYFASTNN_HOST_DEVICE static T exp(T x) { return std::exp(x); }
  PYFASTNN_HOST_DEVICE static T tanh(T x) { return std::tanh(x); }
  PYFASTNN_HOST_DEVICE static T erf(T x) { return std::erf(x); }
  PYFASTNN_HOST_DEVICE static Mask less(T a, T b) { return a < b; }
  PYFASTNN_HOST_DEVICE static Mask greater(T a, T b) { return a > b; }
  PYFASTNN_HOST_DEVICE static T select(Mask m, T if_true, T if_false) { return m ? if_true : if_false; }
};

// One struct per activation with two templated members:
//   forward(x, slope)     the activation of the pre-activation x;
//   derivative(s, slope)  d act / dx, where s is the output y or the pre-activation x, as the layer
//                         kept one of them (derivative_from_output).
// `slope` is leaky_relu's negative_slope (ignored by the others). NaN handling follows PyTorch but
// for relu's derivative at NaN (Relu::active).
namespace act {

struct Identity {
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) { return x; }
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T, T) {
    return MathOps<T>::constant(1.0);
  }
};

struct Relu {
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) {
    using M = MathOps<T>;
    const T zero = M::constant(0.0);
    return M::select(M::less(x, zero), zero, x);  // NaN stays NaN, like torch.relu
  }
  // Where the gradient passes, from the output or the input alike: s > 0. A NaN passes nothing, in
  // every path (the CUDA bit masks and dropout's saved outputs, where a dropped inf is NaN, agree).
  template <typename T> PYFASTNN_HOST_DEVICE static auto active(T s) {
    return MathOps<T>::greater(s, MathOps<T>::constant(0.0));
  }
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T s, T) {
    using M = MathOps<T>;
    return M::select(active(s), M::constant(1.0), M::constant(0.0));
  }
};

struct LeakyRelu {
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T slope) {
    using M = MathOps<T>;
    return M::select(M::greater(x, M::constant(0.0)), x, x * slope);
  }
  // From the pre-activation, or from the output where slope >= 0 (derivative_from_output).
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T s, T slope) {
    using M = MathOps<T>;
    return M::select(M::greater(s, M::constant(0.0)), M::constant(1.0), slope);
  }
};

struct Sigmoid {
  template <typename T> PYFASTNN_HOST_DEVICE static T of(T x) {
    using M = MathOps<T>;
    const T one = M::constant(1.0);
    return one / (one + M::exp(M::constant(0.0) - x));
  }
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) { return of(x); }
  // y is clamped to sigmoid's range: an output saved after dropout in half or bfloat16 and scaled
  // back by (1 - p) can round just past 1, which would turn the derivative's sign (NaN stays NaN).
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T y, T) {
    using M = MathOps<T>;
    const T one = M::constant(1.0);
    y = M::select(M::greater(y, one), one, y);
    return y * (one - y);
  }
};

struct Tanh {
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) { return MathOps<T>::tanh(x); }
  // y is clamped to [-1, 1] for the reason Sigmoid's is (NaN stays NaN).
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T y, T) {
    using M = MathOps<T>;
    const T one = M::constant(1.0), minus_one = M::constant(-1.0);
    y = M::select(M::greater(y, one), one, M::select(M::less(y, minus_one), minus_one, y));
    return one - y * y;
  }
};

struct Gelu {  // x * Phi(x), Phi the standard normal CDF
  template <typename T> PYFASTNN_HOST_DEVICE static T cdf(T x) {
    using M = MathOps<T>;
    return M::constant(0.5) * (M::constant(1.0) + M::erf(x * M::constant(0.70710678118654752440)));
  }
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) { return x * cdf(x); }
  // Phi(x) + x * phi(x)
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T x, T) {
    using M = MathOps<T>;
    const T pdf = M::constant(0.39894228040143267794) * M::exp(M::constant(-0.5) * x * x);
    return cdf(x) + x * pdf;
  }
};

struct GeluTanh {  // 0.5 x (1 + tanh(inner(x))), inner(x) = sqrt(2/pi) (x + 0.044715 x^3)
  // Grouped as torch's own gelu kernels group it (x^3 = (x * x) * x), forward and backward alike.
  template <typename T> PYFASTNN_HOST_DEVICE static T inner(T x) {
    using M = MathOps<T>;
    return M::constant(0.79788456080286535588) * (x + M::constant(0.044715) * (x * x * x));
  }
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) {
    using M = MathOps<T>;
    return M::constant(0.5) * x * (M::constant(1.0) + M::tanh(inner(x)));
  }
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T x, T) {
    using M = MathOps<T>;
    const T one = M::constant(1.0);
    const T t = M::tanh(inner(x));
    const T d_inner = M::constant(0.79788456080286535588) * (one + M::constant(3.0 * 0.044715) * (x * x));
    return M::constant(0.5) * (one + t) + M::constant(0.5) * x * (one - t * t) * d_inner;
  }
};

struct Silu {  // x * sigmoid(x)
  template <typename T> PYFASTNN_HOST_DEVICE static T forward(T x, T) {
    using M = MathOps<T>;
    return x / (M::constant(1.0) + M::exp(M::constant(0.0) - x));
  }
  // s (1 + x (1 - s)), s = sigmoid(x)
  template <typename T> PYFASTNN_HOST_DEVICE static T derivative(T x, T) {
    const T one = MathOps<T>::constant(1.0);
    const T s = Sigmoid::of(x);
    return s * (one + x * (one - s));
  }
};

}  // namespace act

// The pre-activation's gradient g * act'(s), as every backward kernel applies it. relu selects
// instead, like torch's threshold_backward: an inactive unit passes no gradient even when g is inf
// or NaN (a multiplication would make NaN there).
template <typename F, typename T>
PYFASTNN_HOST_DEVICE T chain_rule(T g, T s, T slope) {
  if constexpr (std::is_same_v<F, act::Relu>) {
    return MathOps<T>::select(F::active(s), g, MathOps<T>::constant(0.0));
  } else {
    return g * F::derivative(s, slope);
  }
}

// The one switch from a runtime activation code to a compile-time functor (tiny-cuda-nn style):
// `visit_activation(a, [&](auto functor) { using F = decltype(functor); ... })` instantiates the
// body once per activation, so the per-element loop never branches on the activation. Host code
// only (the CPU loops and the CUDA launchers): under nvcc a __host__ __device__ visitor of a host
// lambda draws a warning per instantiation. No default case: -Wswitch names an activation left out,
// and a code outside the enum (which the ops' checks refuse first) throws rather than computing
// something else.
template <typename Body>
inline decltype(auto) visit_activation(Activation a, Body&& body) {
  switch (a) {
    case Activation::Identity: return body(act::Identity{});
    case Activation::Relu: return body(act::Relu{});
    case Activation::LeakyRelu: return body(act::LeakyRelu{});
    case Activation::Sigmoid: return body(act::Sigmoid{});
    case Activation::Tanh: return body(act::Tanh{});
    case Activation::Gelu: return body(act::Gelu{});
    case Activation::GeluTanh: return body(act::GeluTanh{});
    case Activation::Silu: return body(act::Silu{});
  }
  // A plain message: string arithmetic here would be instantiated inside each per-ISA kernel object
  // (cmake/CheckKernelObjects.cmake refuses such shared weak symbols).
  throw std::invalid_argument("pyfastnn: an activation code outside the activation table");
}

}  // namespace pyfastnn
