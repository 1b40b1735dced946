// biasfast::knn on the CPU: argument checks, dtype dispatch and the metric's final units; the search itself is
// search.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/knn/certify.h"
#include "cpu/knn/metric.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/search.h"

namespace biasfast {
namespace {

// The search's squared transformed distances in the metric's units, in the search's precision.
std::tuple<at::Tensor, at::Tensor> in_metric_units(const Neighbours& found, Metric metric, at::ScalarType dtype) {
  at::Tensor dist = found.dist;
  if (metric == Metric::L2) {
    dist = dist.sqrt();
  } else if (metric == Metric::Cosine || metric == Metric::Pearson) {
    dist = dist * 0.5;  // 1 − cos(u, v) = ‖û − v̂‖² / 2
  }
  return {dist.to(dtype), found.index};
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                           c10::string_view metric, int64_t index_offset, bool exclude_self,
                                           int64_t workspace_mb) {
  select_cpu_isa("knn");
  check_matrix(query, "query");
  check_matrix(ref, "ref");
  BIASFAST_CHECK_ARG(ref.size(1) == query.size(1), "ref", "feature size ", ref.size(1), " does not match query's ",
                     query.size(1));
  BIASFAST_CHECK_ARG(k >= 1, "k", "must be at least 1, got ", k);
  BIASFAST_CHECK_ARG(query.size(0) > 0 && query.size(1) > 0, "query", "is empty (shape ", query.sizes(), ")");
  BIASFAST_CHECK_ARG(ref.size(0) > 0, "ref", "is empty (shape ", ref.sizes(), ")");
  BIASFAST_CHECK_ARG(workspace_mb >= 1, "workspace_mb", "must be at least 1, got ", workspace_mb);
  const Problem problem{query.size(0), ref.size(0), query.size(1), k, parse_metric(std::string(metric)),
                        index_offset, exclude_self, workspace_mb << 20, {}};
  const bool dbl = query.scalar_type() == at::kDouble || ref.scalar_type() == at::kDouble;
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "knn_cpu", [&] {
    using ref_t = scalar_t;
    if (dbl) {
      out = in_metric_units(exact_search<double, ref_t>(query, ref, problem), problem.metric, at::kDouble);
    } else {
      out = in_metric_units(exact_search<float, ref_t>(query, ref, problem), problem.metric, at::kFloat);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("knn", &knn_cpu);
}

}  // namespace biasfast
