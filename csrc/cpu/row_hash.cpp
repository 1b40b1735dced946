// 64-bit hashes of the rows of a 2-D tensor (any dtype), to find rows shared by two training sets
// in one pass instead of comparing every pair of rows. Parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "common/row_hash.h"

namespace biasfast {
namespace {

template <typename scalar_t>
void row_hash_kernel(const scalar_t* rows, int64_t* out, int64_t n, int64_t d, bool floating) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = rows + r * d;
      uint64_t sum = 0;
      for (int64_t i = 0; i < d; ++i) sum += element_term(element_bits(row[i], floating), i);
      const uint64_t h = finish_row(sum, d);
      memcpy(out + r, &h, sizeof(h));
    }
  });
}

at::Tensor row_hash_cpu(const at::Tensor& rows) {
  select_cpu_isa("row_hash", /*has_avx2_variant=*/false);
  BIASFAST_CHECK_ARG(rows.dim() == 2, "rows", "expected a 2-D (rows, features) tensor, got shape ", rows.sizes());
  at::Tensor contiguous = rows.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  const bool floating = at::isFloatingType(rows.scalar_type());
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, rows.scalar_type(), "row_hash_cpu", [&] {
    row_hash_kernel<scalar_t>(contiguous.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), rows.size(0), rows.size(1),
                              floating);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("row_hash", &row_hash_cpu);
}

}  // namespace biasfast
