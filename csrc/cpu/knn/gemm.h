// The inner-product engine of the CPU kNN: ip (nq, nr) = q (nq, d) · r (nr, d)ᵀ on packed row-major tiles.
#pragma once
#include <ATen/ATen.h>

namespace biasfast {

template <typename scalar_t>
void inner_products(const scalar_t* q, const scalar_t* r, scalar_t* ip, int64_t nq, int64_t nr, int64_t d) {
  const auto type = at::CppTypeToScalarType<scalar_t>::value;
  auto opts = at::TensorOptions().dtype(type);
  at::Tensor qt = at::from_blob(const_cast<scalar_t*>(q), {nq, d}, opts);
  at::Tensor rt = at::from_blob(const_cast<scalar_t*>(r), {nr, d}, opts);
  at::Tensor out = at::from_blob(ip, {nq, nr}, opts);
  at::mm_out(out, qt, rt.t());
}

}  // namespace biasfast
