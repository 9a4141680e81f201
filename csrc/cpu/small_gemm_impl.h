// Matrix products for batches of at most kSmallGemmRows rows (float/double, contiguous row-major).
// BLAS libraries are tuned for large shapes: at one row, MKL spends ~16 us on 1x784 @ 784x256, a
// product that streams 0.8 MB of weights and nothing else. These kernels stream each operand once
// with SIMD FMAs over the long dimension and keep every partial sum in registers. Included by
// small_gemm_kernels.cpp (one copy per instruction set); each call fills the slice [begin, end) of
// the dimension the launcher (gemm.cpp) splits between threads, in an order independent of the split.
#pragma once

#include <algorithm>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kernels.h"

namespace pyfastnn::cpu {
namespace CPU_CAPABILITY {

template <typename T>
inline T sum_lanes(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const auto& a, const auto& b) { return a + b; }, v);
}

// y (R x n) = x (R x k) @ w^T, w (n x k): J outputs at a time share each load of x.
template <typename T, int R, int J>
inline void xwt_block(const T* x, const T* w, T* y, int64_t n, int64_t k, int64_t j) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t S = Vec::size();
  const int64_t k_vec = k - k % S;
  Vec acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < J; ++c) acc[r][c] = Vec(T(0));
  for (int64_t p = 0; p < k_vec; p += S) {
    Vec wv[J];
    for (int c = 0; c < J; ++c) wv[c] = Vec::loadu(w + (j + c) * k + p);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * k + p);
      for (int c = 0; c < J; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < J; ++c) {
      T total = sum_lanes(acc[r][c]);
      for (int64_t p = k_vec; p < k; ++p) total += x[r * k + p] * w[(j + c) * k + p];
      y[r * n + j + c] = total;
    }
  }
}

template <typename T, int R>
void small_xwt(const SmallGemm& g, int64_t begin, int64_t end) {
  const auto* x = static_cast<const T*>(g.a);
  const auto* w = static_cast<const T*>(g.b);
  auto* y = static_cast<T*>(g.y);
  int64_t j = begin;
  for (; j + 4 <= end; j += 4) xwt_block<T, R, 4>(x, w, y, g.n, g.k, j);
  for (; j < end; ++j) xwt_block<T, R, 1>(x, w, y, g.n, g.k, j);
}

// NOTE [Blocked sums over the output features]
// The input gradient of a wide layer (a vocabulary head: n = 50,257 or more) sums n products per
// element. One running sum over all n would carry O(n) roundings, ~25x torch.mm's error at such n
// (BLAS sums in blocks of the reduction dimension). Each block of kSumBlock rows of w is summed on its
// own and then added to the result: O(n / kSumBlock + kSumBlock) roundings, at one extra load and
// store of the (L1-resident) result per block.
constexpr int64_t kSumBlock = 256;

// y (R x k) = g (R x n) @ w (n x k), columns [begin, end) of y: U vectors of columns at a time,
// accumulated over the n rows of w in blocks (NOTE [Blocked sums over the output features]).
template <typename T, int R, int U>
inline void gw_block(const T* grad, const T* w, T* y, int64_t n, int64_t k, int64_t p) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t S = Vec::size();
  for (int64_t j0 = 0; j0 < n || j0 == 0; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    Vec acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = Vec(T(0));
    for (int64_t j = j0; j < j1; ++j) {
      Vec wv[U];
      for (int u = 0; u < U; ++u) wv[u] = Vec::loadu(w + j * k + p + u * S);
      for (int r = 0; r < R; ++r) {
        const Vec gv(grad[r * n + j]);
        for (int u = 0; u < U; ++u) acc[r][u] = at::vec::fmadd(gv, wv[u], acc[r][u]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int u = 0; u < U; ++u) {
        T* out = y + r * k + p + u * S;
        (j0 == 0 ? acc[r][u] : acc[r][u] + Vec::loadu(out)).store(out);
      }
    }
  }
}

template <typename T, int R>
void small_gw(const SmallGemm& g, int64_t begin, int64_t end) {
  constexpr int64_t S = at::vec::Vectorized<T>::size();
  const auto* grad = static_cast<const T*>(g.a);
  const auto* w = static_cast<const T*>(g.b);
  auto* y = static_cast<T*>(g.y);
  // Each accumulator is a dependent chain of FMAs: with few rows, more column vectors per block
  // keep enough chains in flight (R * U <= 16 registers of accumulators).
  constexpr int U = R <= 2 ? 8 : 4;
  int64_t p = begin;
  for (; p + U * S <= end; p += U * S) gw_block<T, R, U>(grad, w, y, g.n, g.k, p);
  for (; p + S <= end; p += S) gw_block<T, R, 1>(grad, w, y, g.n, g.k, p);
  for (; p < end; ++p) {
    for (int r = 0; r < R; ++r) {
      T total = 0;
      for (int64_t j0 = 0; j0 < g.n; j0 += kSumBlock) {
        T block = 0;
        for (int64_t j = j0; j < std::min(g.n, j0 + kSumBlock); ++j) block += grad[r * g.n + j] * w[j * g.k + p];
        total += block;
      }
      y[r * g.k + p] = total;
    }
  }
}

// y (n x k) = g^T @ x for g (R x n), x (R x k), rows [begin, end) of y: each output row is a
// combination of the R rows of x.
template <typename T, int R>
void small_gtx(const SmallGemm& g, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t S = Vec::size();
  const auto* grad = static_cast<const T*>(g.a);
  const auto* x = static_cast<const T*>(g.b);
  auto* y = static_cast<T*>(g.y);
  const int64_t k_vec = g.k - g.k % S;
  for (int64_t j = begin; j < end; ++j) {
    Vec coefficient[R];
    for (int r = 0; r < R; ++r) coefficient[r] = Vec(grad[r * g.n + j]);
    for (int64_t p = 0; p < k_vec; p += S) {
      Vec total = coefficient[0] * Vec::loadu(x + p);
      for (int r = 1; r < R; ++r) total = at::vec::fmadd(coefficient[r], Vec::loadu(x + r * g.k + p), total);
      total.store(y + j * g.k + p);
    }
    for (int64_t p = k_vec; p < g.k; ++p) {
      T total = grad[j] * x[p];
      for (int r = 1; r < R; ++r) total += grad[r * g.n + j] * x[r * g.k + p];
      y[j * g.k + p] = total;
    }
  }
}

// One switch from (dtype, rows) to the template instance: a case per row count up to kSmallGemmRows.
static_assert(kSmallGemmRows == 4, "one case per row count in PYFASTNN_SMALL_GEMM_ENTRY");

#define PYFASTNN_SMALL_GEMM_ENTRY(name)                                                        \
  inline void name##_entry(const SmallGemm& g, int64_t begin, int64_t end) {                  \
    const auto run = [&](auto tag) {                                                           \
      using T = decltype(tag);                                                                 \
      switch (g.rows) {                                                                        \
        case 1: return name<T, 1>(g, begin, end);                                              \
        case 2: return name<T, 2>(g, begin, end);                                              \
        case 3: return name<T, 3>(g, begin, end);                                              \
        case 4: return name<T, 4>(g, begin, end);                                              \
        default: TORCH_CHECK(false, "pyfastnn: small GEMM with ", g.rows, " rows");           \
      }                                                                                        \
    };                                                                                         \
    if (g.dtype == c10::ScalarType::Double) return run(double{});                              \
    TORCH_CHECK(g.dtype == c10::ScalarType::Float, "pyfastnn: small GEMM for ", g.dtype);      \
    return run(float{});                                                                       \
  }

PYFASTNN_SMALL_GEMM_ENTRY(small_xwt)
PYFASTNN_SMALL_GEMM_ENTRY(small_gw)
PYFASTNN_SMALL_GEMM_ENTRY(small_gtx)
#undef PYFASTNN_SMALL_GEMM_ENTRY

}  // namespace CPU_CAPABILITY
}  // namespace pyfastnn::cpu
