// CUDA launchers for the fused epilogues: the same activation functors as the CPU (activations.h,
// __host__ __device__), one templated kernel per (dtype, activation), launched on the current
// stream of the tensors' device and checked after every launch.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "../epilogue.h"

namespace pyfastnn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColumnsPerBlock = 32;  // backward: one warp across columns ...
constexpr int kRowLanes = 8;          // ... times 8 row lanes

// Grid-stride loop over rows x cols with 64-bit indices (buffers may exceed 2^31 elements).
template <typename scalar_t, typename F>
__global__ void forward_kernel(int64_t total, int64_t cols, const scalar_t* acc, const scalar_t* bias,
                               scalar_t* preact, scalar_t* out, double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t slope = static_cast<opmath_t>(negative_slope);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    opmath_t v = static_cast<opmath_t>(acc[i]);
    if (bias != nullptr) v += static_cast<opmath_t>(bias[i % cols]);
    if (preact != nullptr) preact[i] = static_cast<scalar_t>(v);
    out[i] = static_cast<scalar_t>(F::forward(v, slope));
  }
}

// Block (x: 32 columns, y: 8 row lanes) handles one row block of rows_per_block rows: each thread
// accumulates its column over its rows, the 8 lanes are added in a fixed order in shared memory, and
// the block writes its own row of partial sums (no atomics: the result is reproducible).
template <typename scalar_t, typename F>
__global__ void backward_kernel(int64_t rows, int64_t cols, int64_t rows_per_block, const scalar_t* grad_out,
                                const scalar_t* saved, scalar_t* grad_pre, at::opmath_type<scalar_t>* sums,
                                double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kIdentity = std::is_same_v<F, act::Identity>;
  const opmath_t slope = static_cast<opmath_t>(negative_slope);
  __shared__ opmath_t lane_sums[kRowLanes][kColumnsPerBlock];
  const int64_t col = int64_t(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  opmath_t total = 0;
  if (col < cols) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRowLanes) {
      const int64_t i = r * cols + col;
      opmath_t g = static_cast<opmath_t>(grad_out[i]);
      if constexpr (!kIdentity) g *= F::derivative(static_cast<opmath_t>(saved[i]), slope);
      if (grad_pre != nullptr) grad_pre[i] = static_cast<scalar_t>(g);
      total += g;
    }
  }
  if (sums == nullptr) return;
  lane_sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    opmath_t block_total = 0;
    for (int lane = 0; lane < kRowLanes; ++lane) block_total += lane_sums[lane][threadIdx.x];
    sums[int64_t(blockIdx.y) * cols + col] = block_total;
  }
}

}  // namespace

void launch_forward_epilogue(const ForwardEpilogue& a, int64_t rows) {
  TORCH_CHECK_NOT_IMPLEMENTED(a.keep_mask == nullptr, "pyfastnn: fused dropout is not implemented for CUDA yet");
  const int64_t total = rows * a.cols;
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    visit_activation(a.activation, [&](auto functor) {
      using F = decltype(functor);
      forward_kernel<scalar_t, F><<<blocks, kThreads, 0, stream>>>(
          total, a.cols, static_cast<const scalar_t*>(a.acc), static_cast<const scalar_t*>(a.bias),
          static_cast<scalar_t*>(a.preact), static_cast<scalar_t*>(a.out), a.negative_slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_backward_epilogue(const BackwardEpilogue& a, int64_t rows, int64_t rows_per_block) {
  TORCH_CHECK_NOT_IMPLEMENTED(a.keep_mask == nullptr, "pyfastnn: fused dropout is not implemented for CUDA yet");
  if (rows == 0 || a.cols == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(row_blocks <= 65535, "pyfastnn: too many row blocks for one launch (", row_blocks, ")");
  const dim3 grid(static_cast<unsigned>((a.cols + kColumnsPerBlock - 1) / kColumnsPerBlock),
                  static_cast<unsigned>(row_blocks));
  const dim3 block(kColumnsPerBlock, kRowLanes);
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using opmath_t = at::opmath_type<scalar_t>;
    visit_activation(a.activation, [&](auto functor) {
      using F = decltype(functor);
      backward_kernel<scalar_t, F><<<grid, block, 0, stream>>>(
          rows, a.cols, rows_per_block, static_cast<const scalar_t*>(a.grad_out),
          static_cast<const scalar_t*>(a.saved), static_cast<scalar_t*>(a.grad_pre),
          static_cast<opmath_t*>(a.column_sums), a.negative_slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pyfastnn::cuda
