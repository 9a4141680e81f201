// CPU launchers of the epilogue passes (epilogue.h): the epilogue kernels over row ranges with
// at::parallel_for (torch.set_num_threads applies); tiny passes stay on the calling thread.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"

namespace pyfastnn::cpu {
namespace {
// Below this many elements a pass is not worth waking other threads for.
constexpr int64_t kElementsPerTask = 32768;
}  // namespace

void launch_forward_epilogue(const ForwardEpilogue& args, int64_t rows) {
  TORCH_INTERNAL_ASSERT(args.relu_mask == nullptr, "pyfastnn: relu bit masks are kept on CUDA only");
  const auto& kernels = epilogue_kernels();
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(args.cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
}

// A block holds ~16K elements, at least 16 rows (a pass of more such blocks than 64 is cut into 64),
// but never more than kMaxChainRows rows: a block adds its rows one after the other, and longer
// chains of float additions lose accuracy (4M rows in 64 blocks summed 10x further from float64
// than torch.sum). A pass too small to split between threads is one block, with no second
// reduction; the blocks' sums are added pairwise (add_block_sums in layer.cpp).
constexpr int64_t kMaxChainRows = 256;

int64_t backward_rows_per_block(int64_t rows, int64_t cols) {
  const int64_t by_size = (16384 + cols - 1) / std::max<int64_t>(cols, 1);
  return std::min(kMaxChainRows, std::max({int64_t{16}, by_size, (rows + 63) / 64}));
}

void launch_backward_epilogue(const BackwardEpilogue& args, int64_t rows, int64_t rows_per_block) {
  const auto& kernels = epilogue_kernels();
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t sums_stride = args.cols * c10::elementSize(at::toOpMathType(args.dtype));
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(rows_per_block * args.cols, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      BackwardEpilogue block_args = args;
      if (args.column_sums != nullptr) {
        block_args.column_sums = static_cast<char*>(args.column_sums) + block * sums_stride;
      }
      kernels.backward(block_args, block * rows_per_block, std::min(rows, (block + 1) * rows_per_block));
    }
  });
}

}  // namespace pyfastnn::cpu
