// Argument checks of knn_hamming, shared by its CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <utility>

#include "common/checks.h"

namespace biasfast {

// 2-D integer token rows of equal length, non-empty, on one device, and k >= 1.
inline void check_hamming_inputs(const at::Tensor& query, const at::Tensor& ref, int64_t k) {
  for (const auto& [t, name] : {std::pair{&query, "query"}, std::pair{&ref, "ref"}}) {
    BIASFAST_CHECK_ARG(t->dim() == 2, name, "expected a 2-D (rows, positions) tensor, got shape ", t->sizes());
    BIASFAST_CHECK_ARG(!at::isFloatingType(t->scalar_type()) && !at::isComplexType(t->scalar_type()), name,
                       "hamming needs integer token tensors, got ", t->scalar_type());
    BIASFAST_CHECK_ARG(t->size(0) > 0, name, "is empty (shape ", t->sizes(), ")");
  }
  BIASFAST_CHECK_ARG(query.device() == ref.device(), "ref", "is on ", ref.device(), " but query is on ",
                     query.device());
  BIASFAST_CHECK_ARG(ref.size(1) == query.size(1), "ref", "sequence length ", ref.size(1),
                     " does not match query's ", query.size(1));
  BIASFAST_CHECK_ARG(k >= 1 && k <= std::numeric_limits<int>::max(), "k", "must be at least 1, got ", k);
}

}  // namespace biasfast
