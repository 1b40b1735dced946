// Exact k-nearest neighbours on the GPU: the tiled kernel of knn_common.cuh with squared distances by direct
// differences (no norm expansion, so near-duplicates keep their precision) and an in-kernel running top-k.
// float16/bfloat16 inputs accumulate in float32. cosine/pearson rows are normalised first (in float64, then
// rounded), then searched as L2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <string>

#include "common/checks.h"
#include "cuda/knn_common.cuh"

namespace biasfast {
namespace {

// Squared L2 distance, one column at a time (float16/bfloat16 tiles hold float32).
struct SquaredDifference {
  template <typename acc_t>
  __device__ static acc_t add(acc_t acc, acc_t a, acc_t b) {
    const acc_t diff = a - b;
    return acc + diff * diff;
  }
};

// (x − mean) / ‖x − mean‖ formed in float64, then rounded once to the search's precision, as the CPU op does: in
// float32 the squares of rows near 1e20 overflow and the norms of near-constant rows cancel.
at::Tensor unit_rows(const at::Tensor& x, bool center, at::ScalarType dtype) {
  at::Tensor rows = x.to(at::kDouble);
  if (center) rows = rows - rows.mean(1, true);
  return (rows / rows.norm(2, 1, true)).to(dtype);
}

// The first row of x (n, d) where `bad` (n,) holds, or −1: one reduction on the device and one scalar read back.
int64_t first_row(const at::Tensor& bad) {
  if (!bad.any().item<bool>()) return -1;
  return bad.to(at::kByte).argmax().item<int64_t>();  // argmax returns the first of equal maxima
}

// The CPU op's row checks, with its words (csrc/cpu/knn/queries.h, pack.h, metric.h): a row holding a NaN or an
// Inf, and for cosine / pearson a row of zero norm / a constant row (its sums in float64, as there), named by its
// global index (ref rows count from index_offset). The queries' NaN check covers every row before the norms are
// looked at; a reference is reported at its first bad row of either kind, as the CPU scan meets them.
void check_rows(const at::Tensor& x, const std::string& metric, const char* name, int64_t offset,
                bool either_kind_first) {
  const at::Tensor non_finite = at::logical_not(at::isfinite(x).all(1));
  const bool standardised = metric == "cosine" || metric == "pearson";
  if (!either_kind_first || !standardised) {
    const int64_t row = first_row(non_finite);
    BIASFAST_CHECK_ARG(row < 0, name, "contains NaN or Inf (first bad row ", row + offset, ")");
    if (!standardised) return;
  }
  at::Tensor rows = x.to(at::kDouble);
  if (metric == "pearson") rows = rows - rows.sum(1, true) / static_cast<double>(rows.size(1));
  const at::Tensor undefined = at::logical_not(rows.square().sum(1) > 0);  // NaN sums count as undefined too
  const int64_t row = first_row(at::logical_or(non_finite, undefined));
  if (row < 0) return;
  BIASFAST_CHECK_ARG(!non_finite[row].item<bool>(), name, "contains NaN or Inf (first bad row ", row + offset, ")");
  BIASFAST_CHECK_ARG(false, name, "row ", row + offset,
                     metric == "pearson" ? " is constant: its pearson distance is undefined"
                                         : " has zero norm: its cosine distance is undefined");
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                            c10::string_view metric_view, int64_t index_offset, bool exclude_self,
                                            int64_t workspace_mb) {
  check_matrix(query, "query");
  check_matrix(ref, "ref");
  BIASFAST_CHECK_ARG(query.device() == ref.device(), "ref", "is on ", ref.device(), " but query is on ",
                     query.device());
  BIASFAST_CHECK_ARG(ref.size(1) == query.size(1), "ref", "feature size ", ref.size(1), " does not match query's ",
                     query.size(1));
  BIASFAST_CHECK_ARG(k >= 1 && k <= std::numeric_limits<int>::max(), "k", "must be at least 1, got ", k);
  BIASFAST_CHECK_ARG(query.size(0) > 0 && query.size(1) > 0, "query", "is empty (shape ", query.sizes(), ")");
  BIASFAST_CHECK_ARG(ref.size(0) > 0, "ref", "is empty (shape ", ref.sizes(), ")");
  const std::string metric(metric_view);
  BIASFAST_CHECK_ARG(metric == "l2" || metric == "sqeuclidean" || metric == "cosine" || metric == "pearson",
                     "metric", "unknown metric '", metric, "' (expected l2, sqeuclidean, cosine or pearson)");
  check_rows(query, metric, "query", 0, /*either_kind_first=*/false);
  check_rows(ref, metric, "ref", index_offset, /*either_kind_first=*/true);
  const c10::cuda::CUDAGuard guard(query.device());
  const bool dbl = query.scalar_type() == at::kDouble || ref.scalar_type() == at::kDouble;
  const auto acc_type = dbl ? at::kDouble : at::kFloat;
  at::Tensor q, r;
  if (metric == "cosine" || metric == "pearson") {
    q = unit_rows(query, metric == "pearson", acc_type).contiguous();
    r = unit_rows(ref, metric == "pearson", acc_type).contiguous();
  } else {
    // Same input dtype: search in it (float16/bfloat16 read as is); mixed dtypes meet in the accumulate type.
    const auto common = query.scalar_type() == ref.scalar_type() ? ref.scalar_type() : acc_type;
    q = query.to(common).contiguous();
    r = ref.to(common).contiguous();
  }
  const int64_t nq = q.size(0);
  at::Tensor dist = at::empty({nq, k}, q.options().dtype(acc_type));
  at::Tensor index = at::empty({nq, k}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "knn_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    knn_gpu::launch_tiled_knn<SquaredDifference, scalar_t, acc_t, acc_t, acc_t>(q, r, k, index_offset, exclude_self,
                                                                                dist, index);
  });
  if (metric == "l2") dist = dist.sqrt();
  if (metric == "cosine" || metric == "pearson") dist = dist * 0.5;
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("knn", &knn_cuda);
}

}  // namespace biasfast
