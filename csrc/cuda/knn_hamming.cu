// Exact k-nearest neighbours under the hamming distance (number of differing positions) on the GPU, for integer
// token rows: the tiled kernel of knn_common.cuh (as knn.cu) counting differing tokens. Counts are exact
// integers, reported as float32; ties go to the lower index. Tokens are compared in their own integer dtype when
// query and ref share it (int64 otherwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>


#include "common/checks.h"
#include "cuda/knn_common.cuh"
#include "common/knn_hamming_checks.h"

namespace biasfast {
namespace {

// One differing position counts 1.
struct Mismatch {
  template <typename token_t>
  __device__ static int add(int acc, token_t a, token_t b) {
    return acc + (a != b);
  }
};

std::tuple<at::Tensor, at::Tensor> knn_hamming_cuda(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                                    int64_t index_offset, bool exclude_self) {
  check_hamming_inputs(query, ref, k);
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
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, common, "knn_hamming_cuda", [&] {
    knn_gpu::launch_tiled_knn<Mismatch, scalar_t, scalar_t, int, float>(q, r, k, index_offset, exclude_self, dist,
                                                                        index);
  });
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("knn_hamming", &knn_hamming_cuda);
}

}  // namespace biasfast
