// 64-bit row hashes on the GPU: one block per row, threads stride over the features and the
// per-thread sums of mixed words are reduced in shared memory (order-free, so deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/row_hash.h"

namespace biasfast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void row_hash_cuda_kernel(const scalar_t* __restrict__ rows, int64_t* __restrict__ out, int64_t d,
                                     bool floating) {
  __shared__ unsigned long long partial[kThreads];
  const scalar_t* row = rows + static_cast<int64_t>(blockIdx.x) * d;
  uint64_t sum = 0;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) sum += element_term(element_bits(row[i], floating), i);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const uint64_t h = finish_row(partial[0], d);
    memcpy(out + blockIdx.x, &h, sizeof(h));
  }
}

at::Tensor row_hash_cuda(const at::Tensor& rows) {
  BIASFAST_CHECK_ARG(rows.dim() == 2, "rows", "expected a 2-D (rows, features) tensor, got shape ", rows.sizes());
  const c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor contiguous = rows.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  if (rows.size(0) == 0) return out;
  const bool floating = at::isFloatingType(rows.scalar_type());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, rows.scalar_type(), "row_hash_cuda", [&] {
    row_hash_cuda_kernel<scalar_t><<<rows.size(0), kThreads, 0, stream>>>(
        contiguous.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), rows.size(1), floating);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("row_hash", &row_hash_cuda);
}

}  // namespace biasfast
