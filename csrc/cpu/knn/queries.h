// The query side of the CPU kNN, prepared once per search: checked for NaN / Inf and undefined transforms,
// centred (L2: by the query mean, which removes a common offset before the inner products), transformed and
// rounded to the scan's precision, with the float64 rows the exact distances use.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "cpu/knn/metric.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/rows.h"

namespace biasfast {

// Runs bad(i) for every i < n, in parallel; returns the first i for which it was true, or −1.
template <typename Bad>
int64_t first_bad_row(int64_t n, Bad bad) {
  std::vector<int64_t> first(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    int64_t& mine = first[at::get_thread_num()];
    for (int64_t i = begin; i < end; ++i)
      if (bad(i)) mine = std::min(mine, i);
  });
  const int64_t i = *std::min_element(first.begin(), first.end());
  return i == std::numeric_limits<int64_t>::max() ? -1 : i;
}

template <typename scalar_t>
struct PreparedQueries {
  at::Tensor exact;   // nq × d float64: the rows, or for cosine / pearson their transform (x − shift) / norm
  at::Tensor packed;  // nq × d scalar_t: (x − shift − center) · scale, what the scan multiplies
  std::vector<double> center;
  std::vector<double> norms;              // ‖packed row‖², in float64
  std::vector<RowTransform> transforms;   // what exact_distance still applies to `exact` (identity once applied)

  const double* exact_row(int64_t i, int64_t d) const { return exact.data_ptr<double>() + i * d; }
  const scalar_t* packed_rows() const { return packed.data_ptr<scalar_t>(); }
};

// The queries of `problem`; `center` as an earlier round used it (a recheck: the rows must transform and round
// exactly as there), or empty to choose it here.
template <typename scalar_t>
PreparedQueries<scalar_t> prepare_queries(const at::Tensor& query, const Problem& problem,
                                          const std::vector<double>& center) {
  const int64_t nq = problem.nq, d = problem.d;
  const Metric metric = problem.metric;
  PreparedQueries<scalar_t> out;
  // Exact in float64, and our own copy: for cosine / pearson it is transformed in place.
  out.exact = query.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  double* qm = out.exact.template data_ptr<double>();
  const double* q = qm;
  const int64_t bad = first_bad_row(nq, [&](int64_t i) { return first_non_finite_row(q + i * d, 1, d) == 0; });
  BIASFAST_CHECK_ARG(bad < 0, "query", "contains NaN or Inf (first bad row ", bad, ")");
  out.center.assign(d, 0.0);
  if (!center.empty()) {
    out.center = center;
  } else if (is_l2(metric)) {
    // Parallel over features; each column is summed in query order.
    at::parallel_for(0, d, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t t = t0; t < t1; ++t) out.center[t] += q[i * d + t];
    });
    for (auto& c : out.center) c /= static_cast<double>(nq);
  }
  out.transforms.resize(nq);
  out.packed = at::empty({nq, d}, at::CppTypeToScalarType<scalar_t>::value);
  out.norms.resize(nq);
  scalar_t* packed = out.packed.template data_ptr<scalar_t>();
  const int64_t undefined = first_bad_row(nq, [&](int64_t i) {
    RowTransform& tr = out.transforms[i];
    if (!try_row_transform(q + i * d, d, metric, &tr)) return true;
    double norm = 0;
    for (int64_t t = 0; t < d; ++t) {
      const scalar_t v = static_cast<scalar_t>((q[i * d + t] - tr.shift - out.center[t]) * tr.scale);
      packed[i * d + t] = v;
      norm += static_cast<double>(v) * static_cast<double>(v);
    }
    out.norms[i] = norm;
    if (!is_l2(metric)) {
      // The exact distances only ever use the transformed query (x − shift) / norm: keep that in place of the
      // row, computed as exact_distance computes it, so the re-rank divides only the reference side.
      for (int64_t t = 0; t < d; ++t) qm[i * d + t] = (qm[i * d + t] - tr.shift) / tr.norm;
      tr = RowTransform{};
    }
    return false;
  });
  if (undefined >= 0) row_transform(q + undefined * d, d, metric, "query", undefined);  // throws its message
  return out;
}

}  // namespace biasfast
