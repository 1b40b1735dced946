// Exact k-nearest neighbours on the GPU: shared-memory tiles of (8 queries × 32 references × 32 features) give
// squared distances by direct differences (no norm expansion, so near-duplicates keep their precision), and each
// query's warp keeps a sorted running top-k, (distance, index) ordered: in shared memory for k <= 256 (the fast
// path), in the output rows in global memory beyond. float16/bfloat16 inputs accumulate in float32; launched on
// the current stream. cosine/pearson rows are normalised first (float32/float64), then searched as L2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <string>

#include "checks.h"
#include "cuda/knn_select.cuh"

namespace biasfast {
namespace {

constexpr int kQueries = 8;    // queries per block, one warp each
constexpr int kRefs = 32;      // references per tile, one lane each
constexpr int kFeatures = 32;  // features per shared-memory chunk

template <typename scalar_t, typename acc_t>
__global__ void knn_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ ref, int64_t nq,
                           int64_t nr, int64_t d, int k, int64_t offset, bool exclude_self, acc_t* __restrict__ out_dist,
                           int64_t* __restrict__ out_index) {
  __shared__ acc_t qs[kQueries][kFeatures];
  __shared__ acc_t rs[kRefs][kFeatures + 1];
  extern __shared__ unsigned char list_memory[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kQueries + warp;
  knn_select::WarpList<acc_t> list(list_memory, kQueries, warp, k, out_dist, out_index, qi);
  if (qi < nq) list.reset(lane);
  for (int64_t j0 = 0; j0 < nr; j0 += kRefs) {
    acc_t acc = 0;
    for (int64_t t0 = 0; t0 < d; t0 += kFeatures) {
      for (int e = threadIdx.x; e < kQueries * kFeatures; e += blockDim.x) {
        const int r = e / kFeatures, t = e % kFeatures;
        const int64_t row = static_cast<int64_t>(blockIdx.x) * kQueries + r;
        qs[r][t] = (row < nq && t0 + t < d) ? static_cast<acc_t>(query[row * d + t0 + t]) : acc_t(0);
      }
      for (int e = threadIdx.x; e < kRefs * kFeatures; e += blockDim.x) {
        const int r = e / kFeatures, t = e % kFeatures;
        rs[r][t] = (j0 + r < nr && t0 + t < d) ? static_cast<acc_t>(ref[(j0 + r) * d + t0 + t]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kFeatures; ++t) {
        const acc_t diff = qs[warp][t] - rs[lane][t];
        acc += diff * diff;
      }
      __syncthreads();
    }
    if (qi >= nq) continue;
    const int64_t j = j0 + lane + offset;
    list.offer(acc, j, j0 + lane < nr && !(exclude_self && j == qi), lane);
  }
  if (qi < nq) list.store(out_dist, out_index, qi, lane);
}

at::Tensor unit_rows(const at::Tensor& x, bool center, at::ScalarType dtype) {
  at::Tensor rows = x.to(dtype);
  if (center) rows = rows - rows.mean(1, true);
  return rows / rows.norm(2, 1, true);
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
  BIASFAST_CHECK_ARG(at::isfinite(query).all().item<bool>(), "query", "contains NaN or Inf");
  BIASFAST_CHECK_ARG(at::isfinite(ref).all().item<bool>(), "ref", "contains NaN or Inf");
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
  const dim3 grid((nq + kQueries - 1) / kQueries), block(kQueries * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "knn_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t list_bytes = knn_select::list_bytes<acc_t>(kQueries, k);
    knn_kernel<scalar_t, acc_t><<<grid, block, list_bytes, stream>>>(
        q.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), nq, r.size(0), q.size(1), static_cast<int>(k), index_offset,
        exclude_self, dist.data_ptr<acc_t>(), index.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (metric == "l2") dist = dist.sqrt();
  if (metric == "cosine" || metric == "pearson") dist = dist * 0.5;
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("knn", &knn_cuda);
}

}  // namespace biasfast
