// The CPU's matrix products (gemm.h): when the small-batch kernels run, and how their work is split
// between threads.
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels.h"

namespace pyfastnn::cpu {
namespace {

enum class SmallGemmKind { XWt, GW, GtX };

// The small-batch kernels take float/double row-major operands with 1..kSmallGemmRows rows;
// anything else goes to ATen's GEMM.
bool use_small_gemm(const at::Tensor& rows_operand, const at::Tensor& other) {
  const int64_t rows = rows_operand.size(0);
  const auto dtype = rows_operand.scalar_type();
  return rows_operand.device().is_cpu() && rows >= 1 && rows <= kSmallGemmRows &&
         (dtype == at::kFloat || dtype == at::kDouble) && rows_operand.is_contiguous() && other.is_contiguous() &&
         rows_operand.numel() > 0 && other.numel() > 0;
}

// Runs a small-batch product on the calling thread and at::parallel_for's pool.
void launch_small_gemm(SmallGemmKind kind, const SmallGemm& args) {
  const auto& kernels = small_gemm_kernels();
  // Split the dimension that indexes independent outputs so each task gets at least kMacsPerTask
  // multiply-adds: a 1x784 @ 784x256 product uses two threads, a 1x128 @ 128x10 one. Columns of gw
  // go in blocks of 128 (a multiple of every kernel's column step), so no split moves a column from
  // the vector loop to the scalar tail: results never depend on the thread count.
  constexpr int64_t kMacsPerTask = 65536;
  constexpr int64_t kColumnBlock = 128;
  if (kind == SmallGemmKind::GW) {
    const int64_t blocks = (args.k + kColumnBlock - 1) / kColumnBlock;
    const int64_t grain = std::max<int64_t>(1, kMacsPerTask / std::max<int64_t>(args.rows * args.n * kColumnBlock, 1));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      kernels.gw(args, begin * kColumnBlock, std::min(args.k, end * kColumnBlock));
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMacsPerTask / std::max<int64_t>(args.rows * args.k, 1));
  const auto kernel = kind == SmallGemmKind::XWt ? kernels.xwt : kernels.gtx;
  at::parallel_for(0, args.n, grain, [&](int64_t begin, int64_t end) { kernel(args, begin, end); });
}

void small_gemm(SmallGemmKind kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& y,
                int64_t n, int64_t k) {
  launch_small_gemm(kind, {a.scalar_type(), a.size(0), n, k, a.data_ptr(), b.data_ptr(), y.data_ptr()});
}

}  // namespace

bool matmul_xwt_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
  if (b.defined() && at::isReducedFloatingType(x.scalar_type())) {
    at::addmm_out(out, b, x, w.t());
    return true;
  }
  if (use_small_gemm(x, w) && out.is_contiguous()) {
    small_gemm(SmallGemmKind::XWt, x, w, out, w.size(0), w.size(1));
  } else {
    at::mm_out(out, x, w.t());
  }
  return false;
}

at::Tensor matmul_gw(const at::Tensor& grad, const at::Tensor& w) {
  if (!use_small_gemm(grad, w)) return at::mm(grad, w);
  at::Tensor y = at::empty({grad.size(0), w.size(1)}, grad.options());
  small_gemm(SmallGemmKind::GW, grad, w, y, w.size(0), w.size(1));
  return y;
}

at::Tensor matmul_gtx(const at::Tensor& grad, const at::Tensor& x) {
  if (!use_small_gemm(grad, x)) return at::mm(grad.t(), x);
  at::Tensor y = at::empty({grad.size(1), x.size(1)}, grad.options());
  small_gemm(SmallGemmKind::GtX, grad, x, y, grad.size(1), x.size(1));
  return y;
}

}  // namespace pyfastnn::cpu
