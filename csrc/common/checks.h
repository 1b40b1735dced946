// Argument checks shared by the kernels: messages name the argument, as Python users see them.
#pragma once
#include <ATen/ATen.h>

#define BIASFAST_CHECK_ARG(cond, name, ...) TORCH_CHECK_VALUE(cond, "biasfast: argument '", name, "': ", __VA_ARGS__)

namespace biasfast {

inline void check_matrix(const at::Tensor& t, const char* name) {
  BIASFAST_CHECK_ARG(t.dim() == 2, name, "expected a 2-D (rows, features) tensor, got shape ", t.sizes());
  BIASFAST_CHECK_ARG(at::isFloatingType(t.scalar_type()), name, "expected a floating dtype, got ", t.scalar_type());
}

// float32 for float32/float16/bfloat16 inputs (float32 accumulation), float64 for float64.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace biasfast
