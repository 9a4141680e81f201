// cuBLASLt GEMMs with fused epilogues: see NOTE [cuBLASLt epilogues and the fallback] in blaslt.h.
#include "blaslt.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace pyfastnn::cuda {
namespace {

// RAII owners of the three cuBLASLt descriptors (created and destroyed per call: cheap host work).
struct MatmulDesc {
  cublasLtMatmulDesc_t raw = nullptr;
  MatmulDesc(cublasComputeType_t compute, cudaDataType_t scale) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw, compute, scale));
  }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(raw); }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(raw, attribute, &value, sizeof(value)));
  }
};

struct Layout {
  cublasLtMatrixLayout_t raw = nullptr;
  // A stored matrix of rows x cols (column-major, leading dimension ld).
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                                    static_cast<uint64_t>(cols), ld));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(raw); }
};

struct Preference {
  cublasLtMatmulPreference_t raw = nullptr;
  Preference() { TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(raw); }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(raw, attribute, &value, sizeof(value)));
  }
};

// The largest power of two (up to 256) dividing the address, as torch tells cuBLASLt.
uint32_t alignment_of(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

cublasLtEpilogue_t to_cublaslt(GemmEpilogue epilogue, bool has_bias) {
  switch (epilogue) {
    case GemmEpilogue::Default: return CUBLASLT_EPILOGUE_DEFAULT;
    case GemmEpilogue::Bias: return CUBLASLT_EPILOGUE_BIAS;
    case GemmEpilogue::Relu: return has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    case GemmEpilogue::ReluAux: return has_bias ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX;
    case GemmEpilogue::GeluTanh: return has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    case GemmEpilogue::GeluTanhAux: return has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    case GemmEpilogue::DRelu: return CUBLASLT_EPILOGUE_DRELU;
    case GemmEpilogue::DGeluTanh: return CUBLASLT_EPILOGUE_DGELU;
    case GemmEpilogue::BiasGradB: return CUBLASLT_EPILOGUE_BGRADB;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

bool uses_aux(GemmEpilogue e) {
  return e == GemmEpilogue::ReluAux || e == GemmEpilogue::GeluTanhAux || e == GemmEpilogue::DRelu ||
         e == GemmEpilogue::DGeluTanh;
}

// Float32 products use TF32 where torch's own cuBLAS would (torch.backends.cuda.matmul.fp32_precision,
// allow_tf32, torch.set_float32_matmul_precision; never inside torch's NoTF32Guard). The precision
// query, not allowTF32CuBLAS(): that one throws once a user has set the newer API alone.
cublasComputeType_t compute_type(c10::ScalarType dtype) {
  const bool tf32 = dtype == at::kFloat && !at::NoTF32Guard::should_disable_tf32() &&
                    at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                        at::Float32Precision::TF32;
  return tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

// The split-K reductions cuBLASLt may use for half and bfloat16, as torch allows them for its own
// cuBLASLt GEMMs (torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction):
// CUBLASLT_REDUCTION_SCHEME_MASK allows every scheme, NONE none but the plain GEMM.
uint32_t reduction_schemes(c10::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return CUBLASLT_REDUCTION_SCHEME_MASK;
  const at::CuBLASReductionOption option = dtype == at::kHalf ? at::globalContext().allowFP16ReductionCuBLAS()
                                                              : at::globalContext().allowBF16ReductionCuBLAS();
  switch (option) {
    case at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK:
      return CUBLASLT_REDUCTION_SCHEME_MASK;
    case at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK:
      return CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE | CUBLASLT_REDUCTION_SCHEME_NONE;
    case at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK:
      return CUBLASLT_REDUCTION_SCHEME_NONE;
  }
  return CUBLASLT_REDUCTION_SCHEME_NONE;  // an option added later: the strictest choice
}

// NOTE [cuBLASLt heuristic cache]
// cublasLtMatmulAlgoGetHeuristic costs host time on every call, while a training loop repeats the
// same few problems. Its answer depends only on the device, the problem (types, compute type,
// transposes, sizes, leading dimensions, epilogue, bias and aux leading dimension), the workspace
// size, the allowed reduction schemes and the alignments of the pointers (the preferences and
// descriptor attributes it reads), so the answer, including "no algorithm", is kept per such key
// (not a query that failed for a passing reason, such as an allocation: it is asked again).
// An algorithm cuBLASLt refuses to launch (not supported, invalid value, wrong architecture), or
// whose launch failed three times in a row, is remembered as "no algorithm" for its key, so the
// fallback is not preceded by the same failing launch on every call. The cache is bounded: a run with
// ever-changing shapes starts it afresh rather than growing without end.
using HeuristicKey = std::array<int64_t, 21>;

struct HeuristicAnswer {
  bool found = false;
  int failed_launches = 0;  // in a row: kFailedLaunchesToDecline of them and the problem is declined
  cublasLtMatmulHeuristicResult_t heuristic = {};
};
constexpr int kFailedLaunchesToDecline = 3;

class HeuristicCache {
 public:
  bool lookup(const HeuristicKey& key, HeuristicAnswer& answer) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = answers_.find(key);
    if (it == answers_.end()) return false;
    answer = it->second;
    return true;
  }
  void store(const HeuristicKey& key, const HeuristicAnswer& answer) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (answers_.size() >= kMaxEntries) answers_.clear();
    answers_[key] = answer;
  }

 private:
  static constexpr size_t kMaxEntries = 4096;
  std::mutex mutex_;
  std::map<HeuristicKey, HeuristicAnswer> answers_;
};

HeuristicCache& heuristic_cache() {
  static HeuristicCache cache;
  return cache;
}

}  // namespace

bool lt_enabled() {
  const char* value = std::getenv("PYFASTNN_CUBLASLT");  // read per call: tests switch it at run time
  return value == nullptr || std::strcmp(value, "0") != 0;
}

bool lt_supports(c10::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;  // float64: cuBLAS
  // The limits torch itself applies before its cuBLASLt bias epilogue (degenerate and huge
  // dimensions hit cuBLASLt bugs there), and int32 leading dimensions.
  constexpr int64_t kMaxDim = 65535LL * 32;
  return m > 1 && n > 1 && k > 1 && m < kMaxDim && n < kMaxDim && k < kMaxDim;
}

bool lt_matmul(const LtGemm& g) {
  if (!lt_enabled() || !lt_supports(g.dtype, g.m, g.n, g.k)) return false;
  const bool has_bias = g.bias != nullptr;
  TORCH_INTERNAL_ASSERT(g.epilogue != GemmEpilogue::Bias || has_bias, "pyfastnn: Bias epilogue without a bias");
  TORCH_INTERNAL_ASSERT(g.epilogue != GemmEpilogue::BiasGradB || has_bias, "pyfastnn: BiasGradB without a bias");
  TORCH_INTERNAL_ASSERT(!has_bias || (g.epilogue != GemmEpilogue::DRelu && g.epilogue != GemmEpilogue::DGeluTanh),
                        "pyfastnn: DRELU/DGELU take no bias (NOTE [cuBLASLt epilogues and the fallback])");
  TORCH_INTERNAL_ASSERT(!uses_aux(g.epilogue) || (g.aux != nullptr && g.aux_ld >= g.m),
                        "pyfastnn: cuBLASLt epilogue without its auxiliary buffer");
  // cuBLASLt's documented requirements on the auxiliary buffer's leading dimension.
  const bool relu_mask = g.epilogue == GemmEpilogue::ReluAux || g.epilogue == GemmEpilogue::DRelu;
  if (uses_aux(g.epilogue) && g.aux_ld % (relu_mask ? 128 : 8) != 0) return false;
  // cuBLASLt's alignment preferences cover A, B, C and D only; a kernel it picks may still assume a
  // 16-byte aligned bias or aux buffer (a sliced bias is not), and would fault rather than decline.
  if ((has_bias && alignment_of(g.bias) < kEpilogueAlignment) ||
      (uses_aux(g.epilogue) && alignment_of(g.aux) < kEpilogueAlignment)) {
    return false;
  }

  const cudaDataType_t type = g.dtype == at::kFloat ? CUDA_R_32F : g.dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
  const cublasComputeType_t compute = compute_type(g.dtype);
  const uint32_t reductions = reduction_schemes(g.dtype);
  MatmulDesc desc(compute, CUDA_R_32F);
  const cublasOperation_t op_a = g.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, op_a);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, op_b);
  const cublasLtEpilogue_t epilogue = to_cublaslt(g.epilogue, has_bias);
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  // Pointers go in before the heuristic query: it reads their alignment.
  if (has_bias) desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  if (uses_aux(g.epilogue)) {
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
    desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld);
  }

  // Stored shapes: op(A) is m x k, so A is stored k x m when transposed; likewise B.
  Layout a_layout(type, g.transpose_a ? g.k : g.m, g.transpose_a ? g.m : g.k, g.lda);
  Layout b_layout(type, g.transpose_b ? g.n : g.k, g.transpose_b ? g.k : g.n, g.ldb);
  Layout d_layout(type, g.m, g.n, g.ldd);

  // torch's own cuBLASLt workspace for this stream, of the size torch's addmm gets (set by
  // CUBLASLT_WORKSPACE_SIZE): no allocation per call, stream-ordered, and safe under graph capture.
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  // NOTE [cuBLASLt heuristic cache]
  const HeuristicKey key{static_cast<int64_t>(c10::cuda::current_device()), static_cast<int64_t>(g.dtype),
                         static_cast<int64_t>(compute), g.transpose_a, g.transpose_b, g.m, g.n, g.k, g.lda, g.ldb,
                         g.ldd, static_cast<int64_t>(epilogue), g.aux_ld, static_cast<int64_t>(workspace_size),
                         alignment_of(g.a), alignment_of(g.b), alignment_of(g.d),
                         has_bias ? alignment_of(g.bias) : 0, uses_aux(g.epilogue) ? alignment_of(g.aux) : 0,
                         has_bias, static_cast<int64_t>(reductions)};
  HeuristicAnswer answer;
  if (!heuristic_cache().lookup(key, answer)) {
    Preference preference;
    preference.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size);
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(g.a));
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(g.b));
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(g.d));
    preference.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(g.d));
    if (reductions != CUBLASLT_REDUCTION_SCHEME_MASK) {
      preference.set(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions);
    }
    int found = 0;
    const cublasStatus_t query = cublasLtMatmulAlgoGetHeuristic(handle, desc.raw, a_layout.raw, b_layout.raw,
                                                                 d_layout.raw, d_layout.raw, preference.raw, 1,
                                                                 &answer.heuristic, &found);
    answer.found = query == CUBLAS_STATUS_SUCCESS && found > 0;
    // The answer for this problem is kept, "none" included, unless the query failed for a reason that
    // says nothing of the problem (an allocation, an internal error): that one is asked again next call.
    const bool transient = query == CUBLAS_STATUS_ALLOC_FAILED || query == CUBLAS_STATUS_INTERNAL_ERROR ||
                           query == CUBLAS_STATUS_EXECUTION_FAILED;
    if (!transient) heuristic_cache().store(key, answer);
  }
  if (!answer.found) return false;
  const cublasLtMatmulHeuristicResult_t& heuristic = answer.heuristic;

  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const float beta = 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.raw, &g.alpha, g.a, a_layout.raw, g.b, b_layout.raw, &beta, g.d, d_layout.raw,
                     g.d, d_layout.raw, &heuristic.algo, workspace, workspace_size,
                     at::cuda::getCurrentCUDAStream());
  // A failed launch leaves D unwritten (cuBLASLt validates before launching): fall back. A problem
  // cuBLASLt cannot run is declined from then on; another failure (an allocation, say) is tried
  // again on the next call, until it has failed kFailedLaunchesToDecline times in a row.
  if (status != CUBLAS_STATUS_SUCCESS) {
    const bool cannot_run = status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE ||
                            status == CUBLAS_STATUS_ARCH_MISMATCH;
    HeuristicAnswer failed = answer;
    if (cannot_run || ++failed.failed_launches >= kFailedLaunchesToDecline) failed = HeuristicAnswer{};
    heuristic_cache().store(key, failed);
    TORCH_WARN_ONCE("pyfastnn: cublasLtMatmul failed (", at::cuda::blas::_cublasGetErrorEnum(status),
                    "), using cuBLAS and pyfastnn's epilogue instead");
    return false;
  }
  if (answer.failed_launches > 0) heuristic_cache().store(key, HeuristicAnswer{true, 0, answer.heuristic});
  return true;
}

}  // namespace pyfastnn::cuda
