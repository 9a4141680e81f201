// Vectorized epilogue kernels. Included by epilogue_kernels.cpp alone, which the build compiles once
// per CPU capability with -DCPU_CAPABILITY=<name>; everything here lives in
// namespace pyfastnn::cpu::CPU_CAPABILITY so the copies never collide.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>

#include "kernels.h"
#include "vec_math.h"

namespace pyfastnn::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads/stores one SIMD step of scalar_t as vectors of its math type: one vector for float/double,
// two float vectors for bfloat16/half (whose register holds twice the lanes).
template <typename scalar_t, typename = void>
struct VecIO {
  using Math = scalar_t;
  static constexpr int kParts = 1;
  using Parts = std::array<Vectorized<Math>, kParts>;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static Parts load(const scalar_t* p, int64_t n) {
    return {n == kStep ? Vectorized<Math>::loadu(p) : Vectorized<Math>::loadu(p, n)};
  }
  static void store(scalar_t* p, const Parts& v, int64_t n) {
    if (n == kStep) {
      v[0].store(p);
    } else {
      v[0].store(p, n);
    }
  }
};

template <typename scalar_t>
struct VecIO<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using Math = float;
  static constexpr int kParts = 2;
  using Parts = std::array<Vectorized<Math>, kParts>;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static Parts load(const scalar_t* p, int64_t n) {
    const auto raw = n == kStep ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(raw);
    return {lo, hi};
  }
  static void store(scalar_t* p, const Parts& v, int64_t n) {
    const auto raw = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
    if (n == kStep) {
      raw.store(p);
    } else {
      raw.store(p, n);
    }
  }
};

// Calls body(offset, column, count) for each SIMD step of rows [row_begin, row_end) of a row-major
// rows x cols buffer; the last step of a row may be partial (count < kStep). Offsets are int64, so
// buffers of more than 2^31 elements index correctly.
template <typename IO, typename Body>
inline void for_each_step(int64_t row_begin, int64_t row_end, int64_t cols, const Body& body) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    for (int64_t j = 0; j < cols; j += IO::kStep) {
      body(i * cols + j, j, std::min<int64_t>(IO::kStep, cols - j));
    }
  }
}

template <typename scalar_t, typename F>
void forward_rows(const ForwardEpilogue& a, int64_t row_begin, int64_t row_end) {
  using IO = VecIO<scalar_t>;
  using Math = typename IO::Math;
  using Vec = Vectorized<Math>;
  const Vec slope(static_cast<Math>(a.negative_slope));
  const auto* acc = static_cast<const scalar_t*>(a.acc);
  const auto* bias = static_cast<const scalar_t*>(a.bias);
  auto* preact = static_cast<scalar_t*>(a.preact);
  auto* out = static_cast<scalar_t*>(a.out);
  uint8_t* keep = a.keep_mask;
  const auto kept_scale = static_cast<Math>(dropout_kept_scale(a.dropout_p));
  for_each_step<IO>(row_begin, row_end, a.cols, [&](int64_t offset, int64_t j, int64_t n) {
    auto v = IO::load(acc + offset, n);
    if (bias != nullptr) {
      const auto b = IO::load(bias + j, n);
      for (int k = 0; k < IO::kParts; ++k) v[k] = v[k] + b[k];
    }
    if (preact != nullptr) IO::store(preact + offset, v, n);
    for (int k = 0; k < IO::kParts; ++k) v[k] = F::forward(v[k], slope);
    if (keep != nullptr) {
      // Draws for a whole step (a pure function of the index, so lanes past n are harmless), as
      // multipliers 0 or 1/(1-p); the loop has a fixed trip count and vectorizes.
      Math multiplier[IO::kStep];
      for (int64_t e = 0; e < IO::kStep; ++e) multiplier[e] = a.dropout.keep(offset + e) ? kept_scale : Math(0);
      for (int64_t e = 0; e < n; ++e) keep[offset + e] = multiplier[e] != Math(0);
      for (int k = 0; k < IO::kParts; ++k) v[k] = v[k] * Vec::loadu(multiplier + k * Vec::size());
    }
    IO::store(out + offset, v, n);
  });
}

template <typename scalar_t, typename F>
void backward_rows(const BackwardEpilogue& a, int64_t row_begin, int64_t row_end) {
  using IO = VecIO<scalar_t>;
  using Math = typename IO::Math;
  using Vec = Vectorized<Math>;
  constexpr bool kIdentity = std::is_same_v<F, act::Identity>;
  const Vec slope(static_cast<Math>(a.negative_slope));
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
  const auto* saved = static_cast<const scalar_t*>(a.saved);
  auto* grad_pre = static_cast<scalar_t*>(a.grad_pre);
  auto* sums = static_cast<Math*>(a.column_sums);
  const uint8_t* keep = a.keep_mask;
  const BackwardFlags flags = backward_flags(a);
  const auto kept_scale = static_cast<Math>(flags.kept_scale);
  const bool rescale_saved = flags.rescale_saved;
  const Vec saved_scale(static_cast<Math>(flags.saved_scale));
  const bool mask_implied = flags.mask_implied;
  for_each_step<IO>(row_begin, row_end, a.cols, [&](int64_t offset, int64_t j, int64_t n) {
    auto g = IO::load(grad_out + offset, n);
    if constexpr (!kIdentity) {
      auto s = IO::load(saved + offset, n);
      for (int k = 0; k < IO::kParts; ++k) {
        if (rescale_saved) s[k] = s[k] * saved_scale;
        g[k] = chain_rule<F>(g[k], s[k], slope);
      }
    }
    if (mask_implied) {
      for (int k = 0; k < IO::kParts; ++k) g[k] = g[k] * Vec(kept_scale);
    } else if (keep != nullptr) {
      Math multiplier[IO::kStep] = {};
      for (int64_t e = 0; e < n; ++e) multiplier[e] = keep[offset + e] != 0 ? kept_scale : Math(0);
      for (int k = 0; k < IO::kParts; ++k) g[k] = g[k] * Vec::loadu(multiplier + k * Vec::size());
    }
    if (grad_pre != nullptr) IO::store(grad_pre + offset, g, n);
    if (sums != nullptr) {
      for (int k = 0; k < IO::kParts; ++k) {
        const int64_t column = j + k * Vec::size();
        const int64_t m = std::min<int64_t>(Vec::size(), a.cols - column);
        if (m <= 0) break;
        (Vec::loadu(sums + column, m) + g[k]).store(sums + column, m);
      }
    }
  });
}

// One switch over dtypes, one over activations: every (dtype, activation) pair is its own loop.
inline void forward_epilogue(const ForwardEpilogue& a, int64_t row_begin, int64_t row_end) {
  visit_dtype(a.dtype, [&](auto tag) {
    visit_activation(a.activation, [&](auto functor) {
      forward_rows<decltype(tag), decltype(functor)>(a, row_begin, row_end);
    });
  });
}
inline void backward_epilogue(const BackwardEpilogue& a, int64_t row_begin, int64_t row_end) {
  visit_dtype(a.dtype, [&](auto tag) {
    visit_activation(a.activation, [&](auto functor) {
      backward_rows<decltype(tag), decltype(functor)>(a, row_begin, row_end);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace pyfastnn::cpu
