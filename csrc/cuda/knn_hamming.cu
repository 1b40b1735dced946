// Exact k-nearest neighbours under the hamming distance (number of differing positions) on the GPU, for integer
// token rows. Same tiling as knn.cu: shared-memory tiles of (8 queries × 32 references × 32 positions), one warp
// per query, one lane per reference; counts are exact integers, reported as float32. Each warp keeps a sorted
// running top-k with ties to the lower index (knn_select.cuh). Tokens are compared in their own integer dtype
// when query and ref share it (int64 otherwise); launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "cuda/knn_select.cuh"

namespace biasfast {
namespace {

constexpr int kQueries = 8;     // queries per block, one warp each
constexpr int kRefs = 32;       // references per tile, one lane each
constexpr int kPositions = 32;  // token positions per shared-memory chunk

template <typename token_t>
__global__ void knn_hamming_kernel(const token_t* __restrict__ query, const token_t* __restrict__ ref, int64_t nq,
                                   int64_t nr, int64_t len, int k, int64_t offset, bool exclude_self,
                                   float* __restrict__ out_dist, int64_t* __restrict__ out_index) {
  __shared__ token_t qs[kQueries][kPositions];
  __shared__ token_t rs[kRefs][kPositions + 1];
  extern __shared__ unsigned char list_memory[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kQueries + warp;
  knn_select::WarpList<float> list(list_memory, kQueries, warp, k, out_dist, out_index, qi);
  if (qi < nq) list.reset(lane);
  for (int64_t j0 = 0; j0 < nr; j0 += kRefs) {
    int64_t differ = 0;
    for (int64_t t0 = 0; t0 < len; t0 += kPositions) {
      // Padding (positions past the end, rows past the last) is 0 on both sides: it never counts.
      for (int e = threadIdx.x; e < kQueries * kPositions; e += blockDim.x) {
        const int r = e / kPositions, t = e % kPositions;
        const int64_t row = static_cast<int64_t>(blockIdx.x) * kQueries + r;
        qs[r][t] = (row < nq && t0 + t < len) ? query[row * len + t0 + t] : token_t(0);
      }
      for (int e = threadIdx.x; e < kRefs * kPositions; e += blockDim.x) {
        const int r = e / kPositions, t = e % kPositions;
        rs[r][t] = (j0 + r < nr && t0 + t < len) ? ref[(j0 + r) * len + t0 + t] : token_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kPositions; ++t) differ += qs[warp][t] != rs[lane][t];
      __syncthreads();
    }
    if (qi >= nq) continue;
    const int64_t j = j0 + lane + offset;
    list.offer(static_cast<float>(differ), j, j0 + lane < nr && !(exclude_self && j == qi), lane);
  }
  if (qi < nq) list.store(out_dist, out_index, qi, lane);
}

std::tuple<at::Tensor, at::Tensor> knn_hamming_cuda(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                                    int64_t index_offset, bool exclude_self) {
  for (const auto& [t, name] : {std::pair{query, "query"}, std::pair{ref, "ref"}}) {
    BIASFAST_CHECK_ARG(t.dim() == 2, name, "expected a 2-D (rows, positions) tensor, got shape ", t.sizes());
    BIASFAST_CHECK_ARG(!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()), name,
                       "hamming needs integer token tensors, got ", t.scalar_type());
    BIASFAST_CHECK_ARG(t.size(0) > 0, name, "is empty (shape ", t.sizes(), ")");
  }
  BIASFAST_CHECK_ARG(query.device() == ref.device(), "ref", "is on ", ref.device(), " but query is on ",
                     query.device());
  BIASFAST_CHECK_ARG(ref.size(1) == query.size(1), "ref", "sequence length ", ref.size(1),
                     " does not match query's ", query.size(1));
  BIASFAST_CHECK_ARG(k >= 1 && k <= std::numeric_limits<int>::max(), "k", "must be at least 1, got ", k);
  const c10::cuda::CUDAGuard guard(query.device());
  // Equality of tokens is all that matters: keep a shared dtype that the kernel is built for, else widen to int64.
  const auto same = query.scalar_type() == ref.scalar_type() ? query.scalar_type() : at::kLong;
  const bool built = same == at::kByte || same == at::kChar || same == at::kShort || same == at::kInt ||
                     same == at::kLong || same == at::kBool;
  const auto common = built ? same : at::kLong;
  const at::Tensor q = query.to(common).contiguous(), r = ref.to(common).contiguous();
  const int64_t nq = q.size(0);
  at::Tensor dist = at::empty({nq, k}, q.options().dtype(at::kFloat));
  at::Tensor index = at::empty({nq, k}, q.options().dtype(at::kLong));
  const dim3 grid((nq + kQueries - 1) / kQueries), block(kQueries * 32);
  const size_t list_bytes = knn_select::list_bytes<float>(kQueries, k);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, common, "knn_hamming_cuda", [&] {
    knn_hamming_kernel<scalar_t><<<grid, block, list_bytes, stream>>>(
        q.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), nq, r.size(0), q.size(1), static_cast<int>(k), index_offset,
        exclude_self, dist.data_ptr<float>(), index.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("knn_hamming", &knn_hamming_cuda);
}

}  // namespace biasfast
