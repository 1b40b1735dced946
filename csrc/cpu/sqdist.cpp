// Exact squared L2 distances on the CPU by direct differences (no norm expansion, so no
// cancellation for near-duplicates): blocked over (x rows, y rows), vectorised over features.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"

namespace biasfast {
namespace {

constexpr int64_t kRowBlock = 8;
constexpr int64_t kColBlock = 64;

template <typename scalar_t>
inline scalar_t squared_difference(const scalar_t* a, const scalar_t* b, int64_t d) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t lanes = Vec::size();
  Vec acc0(0), acc1(0);
  int64_t k = 0;
  for (; k + 2 * lanes <= d; k += 2 * lanes) {
    Vec d0 = Vec::loadu(a + k) - Vec::loadu(b + k);
    Vec d1 = Vec::loadu(a + k + lanes) - Vec::loadu(b + k + lanes);
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  for (; k + lanes <= d; k += lanes) {
    Vec d0 = Vec::loadu(a + k) - Vec::loadu(b + k);
    acc0 = at::vec::fmadd(d0, d0, acc0);
  }
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec& p, Vec& q) { return p + q; }, acc0 + acc1);
  for (; k < d; ++k) {
    scalar_t diff = a[k] - b[k];
    sum += diff * diff;
  }
  return sum;
}

template <typename scalar_t>
void sqdist_kernel(const scalar_t* x, const scalar_t* y, scalar_t* out, int64_t n, int64_t m, int64_t d) {
  const int64_t row_blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t col_blocks = (m + kColBlock - 1) / kColBlock;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = (block / col_blocks) * kRowBlock, j0 = (block % col_blocks) * kColBlock;
      const int64_t i1 = std::min(n, i0 + kRowBlock), j1 = std::min(m, j0 + kColBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          out[i * m + j] = squared_difference(x + i * d, y + j * d, d);
        }
      }
    }
  });
}

at::Tensor sqdist_cpu(const at::Tensor& x, const at::Tensor& y) {
  select_cpu_isa("sqdist", /*has_avx2_variant=*/false);
  check_matrix(x, "x");
  check_matrix(y, "y");
  BIASFAST_CHECK_ARG(x.size(1) == y.size(1), "y", "feature size ", y.size(1), " does not match x's ", x.size(1));
  const auto dtype = accumulate_dtype(x.scalar_type());
  at::Tensor xc = x.to(dtype).contiguous(), yc = y.to(dtype).contiguous();
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options().dtype(dtype));
  if (out.numel() == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sqdist_cpu", [&] {
    sqdist_kernel<scalar_t>(xc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0),
                            y.size(0), x.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("sqdist", &sqdist_cpu);
}

}  // namespace biasfast
