// CUDA launchers for the fused epilogues: the same activation functors as the CPU (activations.h,
// __host__ __device__), one templated kernel per (dtype, activation, vector width), launched on the
// current stream of the tensors' device and checked after every launch.
//
// NOTE [CUDA epilogue passes]
// On CUDA the bias always rides in the GEMM (cuBLASLt's bias epilogue, or addmm in the fallback), so
// the forward pass is purely element-wise: out = dropout(act(acc)). It runs over the flat buffer in
// 128-bit vectors (4 floats, 8 halves/bfloat16s, 2 doubles) when the element count and every pointer
// allow, else one element per step; no division per element. Each thread issues the loads of
// kUnroll vectors before it computes any (for_each_chunk): one load in flight per thread leaves HBM
// idle between round trips, as on the H200 where the passes trailed ATen's element-wise kernels
// (which do the same). The backward pass without a bias sum
// is the same shape of loop; with a bias sum it is a 2-D kernel whose column sums are reduced in a
// fixed order (bitwise reproducible, no atomics).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/core/DistributionsHelper.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "../epilogue.h"

namespace pyfastnn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColumnsPerBlock = 32;  // backward with bias sums: one warp across columns ...
constexpr int kRowLanes = 8;          // ... times 8 row lanes
constexpr int kVectorBytes = 16;      // one 128-bit load or store
constexpr int kUnroll = 4;            // vectors (or elements) in flight per thread in the flat passes

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

// Calls store(chunk, load(chunk)) for every chunk of a grid-stride loop over `chunks`, kUnroll
// chunks at a time: all their loads first, then the computations and stores. Chunk c of a round is
// base + u * stride, so neighbouring threads still touch neighbouring memory (coalesced).
template <typename Load, typename Store>
__device__ __forceinline__ void for_each_chunk(int64_t chunks, const Load& load, const Store& store) {
  using Loaded = decltype(load(int64_t{0}));
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; base < chunks; base += stride * kUnroll) {
    Loaded loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < chunks) loaded[u] = load(base + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < chunks) store(base + u * stride, loaded[u]);
    }
  }
}

// The random numbers of one forward dropout: a Philox state that torch's generator handed out
// (see PhiloxDropout in dropout.h), unpacked inside the kernel so that a captured CUDA graph reads
// the offset current at each replay.
struct DropoutArgs {
  at::PhiloxCudaState philox;
  uint64_t threshold;
  double kept_scale;  // dropout_kept_scale(p)
};

// A forward dropout inside a kernel: element e is kept by word e % 4 of Philox block e / 4
// (PhiloxDropout), whichever kernel and vector width computes it, so every pass drops the same
// elements for the same generator state.
template <typename opmath_t>
struct KernelDropout {
  PhiloxDropout stream;
  opmath_t kept_scale;

  __device__ __forceinline__ KernelDropout(const DropoutArgs& args, bool runs)
      : stream{0, 0, args.threshold}, kept_scale(static_cast<opmath_t>(args.kept_scale)) {
    if (runs) {
      const auto seed_and_offset = at::cuda::philox::unpack(args.philox);
      stream.seed = std::get<0>(seed_and_offset);
      stream.offset = std::get<1>(seed_and_offset);
    }
  }
  // Whether element e, the j-th of a chunk of kVec elements that starts at a multiple of kVec, is
  // kept. `draws` holds the block of 4 draws of the chunk's previous element; it is refreshed where e
  // starts a block or the chunk (one Philox call serves 4 elements).
  template <int kVec>
  __device__ __forceinline__ bool keep(int j, uint64_t e, Philox4x32& draws) const {
    if (kVec % 4 == 0 ? j % 4 == 0 : (j == 0 || (e & 3) == 0)) draws = stream.draws(e);
    return stream.kept(draws, e);
  }
  // Multiplied, as nn.Dropout does (inf * 0 is NaN).
  __device__ __forceinline__ opmath_t apply(opmath_t y, bool kept) const {
    return y * (kept ? kept_scale : opmath_t(0));
  }
};

template <typename scalar_t, typename F, int kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(int64_t chunks, const scalar_t* acc, scalar_t* out, uint8_t* keep_mask, DropoutArgs dropout,
                   double negative_slope) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto slope = static_cast<opmath_t>(negative_slope);
  const KernelDropout<opmath_t> drop(dropout, keep_mask != nullptr);
  using Vector = Pack<scalar_t, kVec>;
  const auto load = [&](int64_t chunk) { return *reinterpret_cast<const Vector*>(acc + chunk * kVec); };
  for_each_chunk(chunks, load, [&](int64_t chunk, const Vector& in) {
    const int64_t first = chunk * kVec;
    Vector result;
    Pack<uint8_t, kVec> kept;
    Philox4x32 draws{};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      opmath_t y = F::forward(static_cast<opmath_t>(in.v[j]), slope);
      if (keep_mask != nullptr) {
        kept.v[j] = drop.template keep<kVec>(j, static_cast<uint64_t>(first + j), draws);
        y = drop.apply(y, kept.v[j]);
      }
      result.v[j] = static_cast<scalar_t>(y);
    }
    *reinterpret_cast<Vector*>(out + first) = result;
    if (keep_mask != nullptr) *reinterpret_cast<Pack<uint8_t, kVec>*>(keep_mask + first) = kept;
  });
}

// The flags of one backward launch as the kernels use them: scalars in the op-math type, and whether
// the dropout mask is read at all.
template <typename opmath_t>
struct BackwardScalars {
  opmath_t slope, saved_scale, kept_scale;
  bool rescale_saved, mask_implied, read_mask;

  __device__ __forceinline__ BackwardScalars(const BackwardFlags& flags, const uint8_t* keep_mask)
      : slope(static_cast<opmath_t>(flags.negative_slope)),
        saved_scale(static_cast<opmath_t>(flags.saved_scale)),
        kept_scale(static_cast<opmath_t>(flags.kept_scale)),
        rescale_saved(flags.rescale_saved),
        mask_implied(flags.mask_implied),
        read_mask(keep_mask != nullptr && !flags.mask_implied) {}

  // One element of grad_pre: g * act'(s), then the dropout mask (see BackwardEpilogue); `kept` is
  // the element's mask entry where read_mask.
  template <typename F>
  __device__ __forceinline__ opmath_t grad_pre(opmath_t g, opmath_t s, bool kept) const {
    if constexpr (!std::is_same_v<F, act::Identity>) {
      if (rescale_saved) s *= saved_scale;
      g = chain_rule<F>(g, s, slope);
    }
    if (mask_implied) return g * kept_scale;
    if (read_mask) return g * (kept ? kept_scale : opmath_t(0));
    return g;
  }
};

// Backward without a bias sum, over the flat buffer like forward_kernel.
template <typename scalar_t, typename F, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_flat_kernel(int64_t chunks, const scalar_t* grad_out, const scalar_t* saved, scalar_t* grad_pre,
                         const uint8_t* keep_mask, BackwardFlags flags) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kIdentity = std::is_same_v<F, act::Identity>;
  const BackwardScalars<opmath_t> scalars(flags, keep_mask);
  using Vector = Pack<scalar_t, kVec>;
  struct Loaded {
    Vector g, s;
    Pack<uint8_t, kVec> kept;
  };
  const auto load = [&](int64_t chunk) {
    const int64_t first = chunk * kVec;
    Loaded in{};
    in.g = *reinterpret_cast<const Vector*>(grad_out + first);
    if constexpr (!kIdentity) in.s = *reinterpret_cast<const Vector*>(saved + first);
    if (scalars.read_mask) in.kept = *reinterpret_cast<const Pack<uint8_t, kVec>*>(keep_mask + first);
    return in;
  };
  for_each_chunk(chunks, load, [&](int64_t chunk, const Loaded& in) {
    Vector result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      result.v[j] = static_cast<scalar_t>(scalars.template grad_pre<F>(
          static_cast<opmath_t>(in.g.v[j]), static_cast<opmath_t>(in.s.v[j]), in.kept.v[j] != 0));
    }
    *reinterpret_cast<Vector*>(grad_pre + chunk * kVec) = result;
  });
}

// Backward with the bias sum. Block (x: 32 columns, y: 8 row lanes) handles one row block of
// rows_per_block rows: each thread accumulates its column over its rows, the 8 lanes are added in a
// fixed order in shared memory, and the block writes its own row of partial sums (no atomics: the
// result is reproducible).
template <typename scalar_t, typename F>
__global__ void backward_sums_kernel(int64_t rows, int64_t cols, int64_t rows_per_block, const scalar_t* grad_out,
                                     const scalar_t* saved, scalar_t* grad_pre, const uint8_t* keep_mask,
                                     at::opmath_type<scalar_t>* sums, BackwardFlags flags) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr bool kIdentity = std::is_same_v<F, act::Identity>;
  const BackwardScalars<opmath_t> scalars(flags, keep_mask);
  __shared__ opmath_t lane_sums[kRowLanes][kColumnsPerBlock];
  const int64_t col = int64_t(blockIdx.x) * kColumnsPerBlock + threadIdx.x;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < rows ? row_begin + rows_per_block : rows;
  opmath_t total = 0;
  if (col < cols) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRowLanes) {
      const int64_t i = r * cols + col;
      const opmath_t s = kIdentity ? opmath_t(0) : static_cast<opmath_t>(saved[i]);
      const opmath_t g = scalars.template grad_pre<F>(static_cast<opmath_t>(grad_out[i]), s,
                                                      scalars.read_mask && keep_mask[i] != 0);
      if (grad_pre != nullptr) grad_pre[i] = static_cast<scalar_t>(g);
      total += g;
    }
  }
  lane_sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    opmath_t block_total = 0;
    for (int lane = 0; lane < kRowLanes; ++lane) block_total += lane_sums[lane][threadIdx.x];
    sums[int64_t(blockIdx.y) * cols + col] = block_total;
  }
}

// relu, then dropout where keep_mask is set, of rows whose width is a multiple of 8, 8 elements at a
// time (one 128-bit vector of half or bfloat16, two of float), writing their 8 signs as one byte of
// the bit mask (NOTE [relu bit masks] in layer.h) as it goes: no second pass over the output. The bit
// is taken from the stored (rounded, dropped-out) output, as pack_relu_mask_kernel takes it, and the
// dropout is forward_kernel's (KernelDropout). The thread of a row's last data byte also writes the
// row's padding bytes (0): the mask needs no zeroing first. index_t: 32 bits where the chunks allow
// (a cheaper division).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    relu_and_mask_kernel(int64_t chunks, int64_t chunks_per_row, int64_t mask_row_bytes, const scalar_t* acc,
                         scalar_t* out, uint8_t* mask, uint8_t* keep_mask, DropoutArgs dropout) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vector = Pack<scalar_t, 8>;
  const KernelDropout<opmath_t> drop(dropout, keep_mask != nullptr);
  const auto load = [&](int64_t chunk) { return *reinterpret_cast<const Vector*>(acc + chunk * 8); };
  for_each_chunk(chunks, load, [&](int64_t chunk, const Vector& in) {
    const int64_t first = chunk * 8;
    Vector result;
    Pack<uint8_t, 8> kept;
    Philox4x32 draws{};
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      opmath_t y = act::Relu::forward(static_cast<opmath_t>(in.v[j]), opmath_t(0));
      if (keep_mask != nullptr) {
        kept.v[j] = drop.template keep<8>(j, static_cast<uint64_t>(first + j), draws);
        y = drop.apply(y, kept.v[j]);
      }
      result.v[j] = static_cast<scalar_t>(y);
      if (act::Relu::active(static_cast<opmath_t>(result.v[j]))) bits |= uint8_t(1u << j);
    }
    *reinterpret_cast<Vector*>(out + first) = result;
    if (keep_mask != nullptr) *reinterpret_cast<Pack<uint8_t, 8>*>(keep_mask + first) = kept;
    const auto c = static_cast<index_t>(chunk), per_row = static_cast<index_t>(chunks_per_row);
    const index_t row = c / per_row;
    const index_t byte = c - row * per_row;
    uint8_t* row_mask = mask + static_cast<int64_t>(row) * mask_row_bytes;
    row_mask[byte] = bits;
    if (byte + 1 == per_row) {
      for (int64_t padding = chunks_per_row; padding < mask_row_bytes; ++padding) row_mask[padding] = 0;
    }
  });
}

// One thread per mask byte: 8 outputs of one row (padding bits past the last column are 0).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pack_relu_mask_kernel(int64_t rows, int64_t cols, int64_t row_bytes, const scalar_t* out, uint8_t* mask) {
  const int64_t total = rows * row_bytes;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t row = i / row_bytes;  // one division per byte, not per element
    const int64_t first = (i - row * row_bytes) * 8;
    uint8_t bits = 0;
    for (int b = 0; b < 8 && first + b < cols; ++b) {
      const auto value = static_cast<at::opmath_type<scalar_t>>(out[row * cols + first + b]);
      if (act::Relu::active(value)) bits |= uint8_t(1u << b);
    }
    mask[i] = bits;
  }
}

bool aligned(const void* pointer, size_t bytes) {
  return pointer == nullptr || reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

// Blocks for a grid-stride loop over `chunks` work items: one item per thread up to enough blocks to
// fill every SM several times over (a small pass keeps its parallelism; for_each_chunk gives a
// thread of a large one kUnroll items per round).
int grid_for(int64_t chunks) {
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 16;
  return static_cast<int>(std::min<int64_t>((chunks + kThreads - 1) / kThreads, max_blocks));
}

// One Philox state per layer and call from torch's default CUDA generator for this device: seeded by
// torch.manual_seed, advanced every call, and graph-safe (under capture the offset is read from
// device memory that each replay advances).
at::PhiloxCudaState draw_philox_state() {
  auto* generator = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator());
  std::lock_guard<std::mutex> lock(generator->mutex_);
  // Offsets count 32-bit draws per thread (torch's convention); each element group draws one 128-bit
  // block at counter {offset / 4, group}, so 4 is all a call uses (see Philox4x32 in dropout.h).
  return generator->philox_cuda_state(4);
}

// The relu bit mask of a rows x cols output, from the output (the pass that wrote it could not).
void launch_pack_relu_mask(c10::ScalarType dtype, const void* out, int64_t rows, int64_t cols, uint8_t* mask,
                           int64_t mask_row_bytes) {
  const int64_t total = rows * mask_row_bytes;
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  visit_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    pack_relu_mask_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        rows, cols, mask_row_bytes, static_cast<const scalar_t*>(out), mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_forward_epilogue(const ForwardEpilogue& a, int64_t rows) {
  TORCH_INTERNAL_ASSERT(a.bias == nullptr, "pyfastnn: on CUDA the bias is added by the GEMM");
  // A kept pre-activation is where the GEMM wrote (acc): nothing to copy.
  TORCH_INTERNAL_ASSERT(a.preact == nullptr || a.preact == a.acc, "pyfastnn: on CUDA the GEMM writes the pre-activation");
  TORCH_INTERNAL_ASSERT(a.relu_mask == nullptr || a.activation == Activation::Relu,
                        "pyfastnn: a relu bit mask is kept for relu only");
  const int64_t total = rows * a.cols;
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  DropoutArgs dropout{};
  if (a.keep_mask != nullptr) {
    dropout.philox = draw_philox_state();
    dropout.threshold = dropout_threshold(a.dropout_p);
    dropout.kept_scale = dropout_kept_scale(a.dropout_p);
  }
  // The relu pass writes the bit mask itself where rows split into 8-element chunks (one mask byte);
  // otherwise a second pass packs it from the output. Bit masks are kept for float, half, bfloat16.
  const size_t chunk_bytes = 8 * c10::elementSize(a.dtype);
  const bool mask_in_pass = a.relu_mask != nullptr && a.dtype != at::kDouble && a.cols % 8 == 0 &&
                            aligned(a.acc, chunk_bytes) && aligned(a.out, chunk_bytes) && aligned(a.keep_mask, 8);
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int kVec = vector_width<scalar_t>();
    const bool vectorized = total % kVec == 0 && aligned(a.acc, kVectorBytes) && aligned(a.out, kVectorBytes) &&
                            aligned(a.keep_mask, kVec);
    const auto* acc = static_cast<const scalar_t*>(a.acc);
    auto* out = static_cast<scalar_t*>(a.out);
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (mask_in_pass) {
        const int64_t chunks = total / 8;
        if (chunks <= std::numeric_limits<uint32_t>::max()) {
          relu_and_mask_kernel<scalar_t, uint32_t><<<grid_for(chunks), kThreads, 0, stream>>>(
              chunks, a.cols / 8, a.relu_mask_row_bytes, acc, out, a.relu_mask, a.keep_mask, dropout);
        } else {
          relu_and_mask_kernel<scalar_t, int64_t><<<grid_for(chunks), kThreads, 0, stream>>>(
              chunks, a.cols / 8, a.relu_mask_row_bytes, acc, out, a.relu_mask, a.keep_mask, dropout);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    visit_activation(a.activation, [&](auto functor) {
      using F = decltype(functor);
      if (vectorized) {
        forward_kernel<scalar_t, F, kVec><<<grid_for(total / kVec), kThreads, 0, stream>>>(
            total / kVec, acc, out, a.keep_mask, dropout, a.negative_slope);
      } else {
        forward_kernel<scalar_t, F, 1><<<grid_for(total), kThreads, 0, stream>>>(
            total, acc, out, a.keep_mask, dropout, a.negative_slope);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (a.relu_mask != nullptr && !mask_in_pass) {
    launch_pack_relu_mask(a.dtype, a.out, rows, a.cols, a.relu_mask, a.relu_mask_row_bytes);
  }
}

// At most 256 blocks of at least 64 rows: enough thread blocks to fill the GPU while the partial sums
// stay small.
int64_t backward_rows_per_block(int64_t rows, int64_t /*cols*/) { return std::max<int64_t>(64, (rows + 255) / 256); }

void launch_backward_epilogue(const BackwardEpilogue& a, int64_t rows, int64_t rows_per_block) {
  if (rows == 0 || a.cols == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const BackwardFlags flags = backward_flags(a);
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using opmath_t = at::opmath_type<scalar_t>;
    visit_activation(a.activation, [&](auto functor) {
      using F = decltype(functor);
      const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
      const auto* saved = static_cast<const scalar_t*>(a.saved);
      auto* grad_pre = static_cast<scalar_t*>(a.grad_pre);
      if (a.column_sums != nullptr) {
        const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;
        TORCH_CHECK(row_blocks <= 65535, "pyfastnn: too many row blocks for one launch (", row_blocks, ")");
        const dim3 grid(static_cast<unsigned>((a.cols + kColumnsPerBlock - 1) / kColumnsPerBlock),
                        static_cast<unsigned>(row_blocks));
        const dim3 block(kColumnsPerBlock, kRowLanes);
        backward_sums_kernel<scalar_t, F><<<grid, block, 0, stream>>>(
            rows, a.cols, rows_per_block, grad_out, saved, grad_pre, a.keep_mask,
            static_cast<opmath_t*>(a.column_sums), flags);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      TORCH_INTERNAL_ASSERT(grad_pre != nullptr, "pyfastnn: a backward pass with nothing to write");
      const int64_t total = rows * a.cols;
      constexpr int kVec = vector_width<scalar_t>();
      const bool vectorized = total % kVec == 0 && aligned(grad_out, kVectorBytes) && aligned(saved, kVectorBytes) &&
                              aligned(grad_pre, kVectorBytes) && aligned(a.keep_mask, kVec);
      if (vectorized) {
        backward_flat_kernel<scalar_t, F, kVec><<<grid_for(total / kVec), kThreads, 0, stream>>>(
            total / kVec, grad_out, saved, grad_pre, a.keep_mask, flags);
      } else {
        backward_flat_kernel<scalar_t, F, 1><<<grid_for(total), kThreads, 0, stream>>>(
            total, grad_out, saved, grad_pre, a.keep_mask, flags);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace pyfastnn::cuda
