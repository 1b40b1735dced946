// The row hash shared by the CPU and CUDA kernels (and mirrored in biasfast/reference.py::row_hash):
//   h = mix(d XOR sum_i mix(bits_i + (i + 1) * kGolden))   (all arithmetic mod 2^64)
// bits_i = the element's bit pattern zero-extended to 64 bits, with -0.0 folded into 0.0.
// A sum of mixed words is order-free, so any reduction order (threads, warps) gives the same hash.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define BIASFAST_HD __host__ __device__ __forceinline__
#else
#define BIASFAST_HD inline
#endif

namespace biasfast {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

BIASFAST_HD uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Exact zero test: through float for float/half/bfloat16 (exact widening), directly for double.
template <typename scalar_t>
BIASFAST_HD bool is_zero(scalar_t v) {
  return static_cast<float>(v) == 0.0f;
}
BIASFAST_HD bool is_zero(double v) {
  return v == 0.0;
}

template <typename scalar_t>
BIASFAST_HD uint64_t element_bits(scalar_t v, bool floating) {
  if (floating && is_zero(v)) return 0;  // folds -0.0 into 0.0
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(scalar_t));  // little-endian: low bytes hold the element
  return bits;
}

BIASFAST_HD uint64_t element_term(uint64_t bits, int64_t i) {
  return mix64(bits + static_cast<uint64_t>(i + 1) * kGolden);
}

BIASFAST_HD uint64_t finish_row(uint64_t sum, int64_t d) {
  return mix64(sum ^ static_cast<uint64_t>(d));
}

}  // namespace biasfast
