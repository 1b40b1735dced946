// Pieces shared by the fused loss kernels (csrc/cpu/snr_loss.cpp, csrc/cpu/hybrid_loss.cpp): the reduction
// argument, a recycled gradient buffer, and the AVX2 loads, stores and exp of float/half/bfloat16 lanes.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <string_view>

#include "common/checks.h"
#include "common/isa.h"

#ifdef BIASFAST_HAVE_AVX2_BUILD
#include <immintrin.h>
#define BIASFAST_X86 1
#endif

namespace biasfast {

enum class Reduction { kMean, kSum, kNone };

inline Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  BIASFAST_CHECK_ARG(reduction == "none", "reduction", "expected 'mean', 'sum' or 'none', got '", reduction, "'");
  return Reduction::kNone;
}

// A gradient buffer recycled between training steps: a fresh multi-megabyte allocation is mmap'ed and
// page-faulted on first touch, which costs more than the loss itself. The storage is reused only when
// nothing else references it any more (the previous step's backward has consumed and dropped it).
// Each op keeps its own (a static RecycledBuffer in its kernel file), so two losses never evict each other.
class RecycledBuffer {
 public:
  at::Tensor like(const at::Tensor& tensor) {
    const auto nbytes = static_cast<size_t>(tensor.numel()) * tensor.element_size();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!cached_ || cached_.use_count() != 1 || cached_.nbytes() != nbytes || cached_.device() != tensor.device()) {
      cached_ = at::empty({tensor.numel()}, tensor.options()).storage();
    }
    return at::empty({0}, tensor.options()).set_(cached_, 0, tensor.sizes());
  }

 private:
  std::mutex mutex_;
  c10::Storage cached_;
};

inline void store_fence() {
#ifdef BIASFAST_X86
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the threads join
#endif
}

#ifdef BIASFAST_X86

BIASFAST_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
BIASFAST_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
BIASFAST_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Round to nearest even like c10::BFloat16(float); NaN becomes the canonical quiet NaN 0x7FC0.
BIASFAST_AVX2 inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: [0..3 0..3 | 4..7 4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

template <bool kStream>
BIASFAST_AVX2 inline void store8(float* x, __m256 v) {
  if constexpr (kStream) _mm256_stream_ps(x, v); else _mm256_storeu_ps(x, v);
}
template <bool kStream>
BIASFAST_AVX2 inline void store8(c10::Half* x, __m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(x), h);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(x), h);
}
template <bool kStream>
BIASFAST_AVX2 inline void store8(c10::BFloat16* x, __m256 v) {
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(x), to_bf16(v));
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(x), to_bf16(v));
}

// e^x of 8 floats (Cephes expf: x = n·ln2 + r, degree-6 polynomial in r), within 2 ulp of std::exp on
// [−87.3, 88.3]; inputs outside are clamped to that range (finite results, no inf).
BIASFAST_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// Natural log of 8 positive normal floats (Cephes logf: x = m·2^e with m in [√½, √2), degree-8 polynomial in
// m − 1), within 1 ulp of std::log; callers keep x ≥ FLT_MIN (no zero, denormal, negative or NaN handling).
BIASFAST_AVX2 inline __m256 log8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23),
                                                 _mm256_set1_epi32(126)));
  x = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000))), _mm256_set1_ps(0.5f));
  const __m256 below = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, below));
  x = _mm256_add_ps(_mm256_sub_ps(x, one), _mm256_and_ps(x, below));  // m − 1, m doubled when below √½
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  for (const float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                        -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f}) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  }
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(x, y));
}

// Horizontal sum of 8 lanes in a fixed order.
BIASFAST_AVX2 inline float sum8(__m256 acc) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif  // BIASFAST_X86

}  // namespace biasfast
