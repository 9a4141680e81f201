// MathOps for ATen's SIMD vectors, so the functors in activations.h run unchanged on
// at::vec::Vectorized<float> / <double> (a lane-wise select replaces the scalar branch).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../activations.h"

namespace pyfastnn {

template <typename S>
struct MathOps<at::vec::Vectorized<S>> {
  using Vec = at::vec::Vectorized<S>;
  using Mask = Vec;  // all-ones lanes where the comparison holds
  static inline Vec constant(double v) { return Vec(static_cast<S>(v)); }
  static inline Vec exp(const Vec& x) { return x.exp(); }
  static inline Vec tanh(const Vec& x) { return x.tanh(); }
  static inline Vec erf(const Vec& x) { return x.erf(); }
  static inline Mask less(const Vec& a, const Vec& b) { return a < b; }
  static inline Mask greater(const Vec& a, const Vec& b) { return a > b; }
  static inline Vec select(const Mask& m, const Vec& if_true, const Vec& if_false) {
    return Vec::blendv(if_false, if_true, m);
  }
};

}  // namespace pyfastnn
