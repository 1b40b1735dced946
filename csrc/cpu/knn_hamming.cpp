// Exact k-nearest neighbours under the hamming distance (number of differing positions) for integer tokens.
// Distances are small integers, so direct comparison is exact; blocked over references, parallel over queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/knn/heap.h"
#include "common/knn_hamming_checks.h"

namespace biasfast {
namespace {

constexpr int64_t kRefBlock = 256;

std::tuple<at::Tensor, at::Tensor> knn_hamming_cpu(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                                   int64_t index_offset, bool exclude_self) {
  select_cpu_isa("knn_hamming", /*has_avx2_variant=*/false);
  check_hamming_inputs(query, ref, k);
  const at::Tensor q = query.to(at::kLong).contiguous(), r = ref.to(at::kLong).contiguous();
  const int64_t nq = q.size(0), nr = r.size(0), len = q.size(1);
  const int64_t* qp = q.data_ptr<int64_t>();
  const int64_t* rp = r.data_ptr<int64_t>();
  std::vector<Entry<float>> heaps(nq * k);
  std::vector<int64_t> sizes(nq, 0);
  at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zeros(kRefBlock, 0.0f), counts(kRefBlock);
    for (int64_t j0 = 0; j0 < nr; j0 += kRefBlock) {
      const int64_t n = std::min(kRefBlock, nr - j0);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t* a = qp + i * len;
          const int64_t* b = rp + (j0 + j) * len;
          int64_t diff = 0;
          for (int64_t t = 0; t < len; ++t) diff += a[t] != b[t];
          // select_row ranks norms − 2·ip: feed −diff/2 as "ip" with zero norms, i.e. the count itself.
          counts[j] = -0.5f * static_cast<float>(diff);
        }
        HeapView<float> heap{heaps.data() + i * k, k, &sizes[i]};
        select_row(heap, counts.data(), zeros.data(), n, j0 + index_offset, exclude_self ? i : -1);
      }
    }
  });
  at::Tensor dist = at::empty({nq, k}, at::kFloat);
  at::Tensor index = at::empty({nq, k}, at::kLong);
  float* dp = dist.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, nq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Entry<float>* h = heaps.data() + i * k;
      std::sort(h, h + sizes[i], [](const Entry<float>& a, const Entry<float>& b) { return worse(b, a); });
      for (int64_t c = 0; c < k; ++c) {
        dp[i * k + c] = h[c].value;  // padding entries are (inf, -1) already
        ip[i * k + c] = h[c].index;
      }
    }
  });
  return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("knn_hamming", &knn_hamming_cpu);
}

}  // namespace biasfast
