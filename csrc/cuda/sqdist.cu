// Exact squared L2 distances on the GPU by direct differences, tiled through shared memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"

namespace biasfast {
namespace {

constexpr int kTile = 16;

template <typename scalar_t>
__global__ void sqdist_cuda_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                   scalar_t* __restrict__ out, int64_t n, int64_t m, int64_t d) {
  __shared__ scalar_t xs[kTile][kTile + 1];
  __shared__ scalar_t ys[kTile][kTile + 1];
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t yrow = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;
  scalar_t acc = 0;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    const int64_t k = k0 + threadIdx.x;
    xs[threadIdx.y][threadIdx.x] = (i < n && k < d) ? x[i * d + k] : scalar_t(0);
    ys[threadIdx.y][threadIdx.x] = (yrow < m && k < d) ? y[yrow * d + k] : scalar_t(0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) {
      scalar_t diff = xs[threadIdx.y][kk] - ys[threadIdx.x][kk];
      acc += diff * diff;
    }
    __syncthreads();
  }
  if (i < n && j < m) out[i * m + j] = acc;
}

at::Tensor sqdist_cuda(const at::Tensor& x, const at::Tensor& y) {
  check_matrix(x, "x");
  check_matrix(y, "y");
  BIASFAST_CHECK_ARG(x.device() == y.device(), "y", "is on ", y.device(), " but x is on ", x.device());
  BIASFAST_CHECK_ARG(x.size(1) == y.size(1), "y", "feature size ", y.size(1), " does not match x's ", x.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = accumulate_dtype(x.scalar_type());
  at::Tensor xc = x.to(dtype).contiguous(), yc = y.to(dtype).contiguous();
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const dim3 block(kTile, kTile);
  const dim3 grid((y.size(0) + kTile - 1) / kTile, (x.size(0) + kTile - 1) / kTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sqdist_cuda", [&] {
    sqdist_cuda_kernel<scalar_t><<<grid, block, 0, stream>>>(xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                                              out.data_ptr<scalar_t>(), x.size(0), y.size(0),
                                                              x.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CUDA, m) {
  m.impl("sqdist", &sqdist_cuda);
}

}  // namespace biasfast
