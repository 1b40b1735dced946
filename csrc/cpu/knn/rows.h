// Per-row work of the CPU kNN: checking, summing, transforming and packing a row, and the exact float64 distance
// of the re-rank; vectorised (AVX2) for contiguous float32 reference rows, plain float64 for the generic path, so
// one transform rule (metric.h: try_row_transform) serves both.
//
// Why the AVX2 forms: once the inner products run near the FMA peak (packed.h), the scalar per-row work (a float64
// copy of every row, a strided scatter per feature) was 8–10% of an L2 search at d ≥ 512 and ~15% of a pearson
// one. Values are rounded exactly as in the generic code of pack.h; only the summation orders of the float64 row
// sums differ (fixed, so equal rows still give equal results). They are compiled without FMA (isa.h) so that no
// product is fused into a sum.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "common/isa.h"

namespace biasfast {

// The first of rows [0, n) (row-major, n × d) holding a NaN or an Inf, or −1.
inline int64_t first_non_finite_row(const double* rows, int64_t n, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t < d; ++t) {
      if (!std::isfinite(rows[i * d + t])) return i;
    }
  }
  return -1;
}

// Σ diff(t)² over t < d in float64, in four interleaved partial sums (vectorised; no single latency chain).
template <typename Diff>
inline double sum_of_squares(int64_t d, Diff diff) {
  double acc[4] = {0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 4 <= d; t += 4) {
    for (int u = 0; u < 4; ++u) {
      const double v = diff(t + u);
      acc[u] += v * v;
    }
  }
  for (; t < d; ++t) {
    const double v = diff(t);
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Whether row[0, d) holds a NaN or an Inf.
BIASFAST_AVX2_NO_FMA inline bool has_non_finite(const float* row, int64_t d) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 bad = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= d; t += 8)  // |x| !< inf: Inf, or NaN (unordered)
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(row + t), abs_mask), inf, _CMP_NLT_UQ));
  if (!_mm256_testz_ps(bad, bad)) return true;
  for (; t < d; ++t)
    if (!std::isfinite(row[t])) return true;
  return false;
}

// Σ row[t] and Σ (row[t] − shift)² of a float64 row (the generic path's rows), in order.
inline double row_sum(const double* row, int64_t d) {
  double sum = 0;
  for (int64_t t = 0; t < d; ++t) sum += row[t];
  return sum;
}

inline double row_sum_of_squares(const double* row, double shift, int64_t d) {
  double ss = 0;
  for (int64_t t = 0; t < d; ++t) {
    const double v = row[t] - shift;
    ss += v * v;
  }
  return ss;
}

// Σ row[t] in float64 (16 partial sums, t mod 16, then a fixed tree).
BIASFAST_AVX2_NO_FMA inline double row_sum(const float* row, int64_t d) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16)
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_add_pd(acc[u], _mm256_cvtps_pd(_mm_loadu_ps(row + t + 4 * u)));
  alignas(32) double s[4];
  _mm256_store_pd(s, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  for (; t < d; ++t) s[t % 4] += row[t];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Σ (row[t] − shift)² in float64 (summed as row_sum).
BIASFAST_AVX2_NO_FMA inline double row_sum_of_squares(const float* row, double shift, int64_t d) {
  const __m256d c = _mm256_set1_pd(shift);
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) {
    for (int u = 0; u < 4; ++u) {
      const __m256d v = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(row + t + 4 * u)), c);
      acc[u] = _mm256_add_pd(acc[u], _mm256_mul_pd(v, v));
    }
  }
  alignas(32) double s[4];
  _mm256_store_pd(s, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  for (; t < d; ++t) {
    const double v = row[t] - shift;
    s[t % 4] += v * v;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// out[t] = float(((row[t] − shift) − center[t]) · scale) (in float64, rounded once), the packed row of pack.h;
// returns Σ out[t]² in float64, summed as sum_of_squares does (partial sum t mod 4, then (s0 + s1) + (s2 + s3)).
BIASFAST_AVX2_NO_FMA inline double transform_row(const float* row, double shift, const double* center, double scale,
                                                 int64_t d, float* out) {
  const __m256d vshift = _mm256_set1_pd(shift), vscale = _mm256_set1_pd(scale);
  __m256d acc = _mm256_setzero_pd();
  int64_t t = 0;
  for (; t + 4 <= d; t += 4) {
    const __m256d x = _mm256_sub_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(row + t)), vshift),
                                    _mm256_loadu_pd(center + t));
    const __m128 v = _mm256_cvtpd_ps(_mm256_mul_pd(x, vscale));
    _mm_storeu_ps(out + t, v);
    const __m256d w = _mm256_cvtps_pd(v);
    acc = _mm256_add_pd(acc, _mm256_mul_pd(w, w));
  }
  alignas(32) double s[4];
  _mm256_store_pd(s, acc);
  for (; t < d; ++t) {
    out[t] = static_cast<float>((static_cast<double>(row[t]) - shift - center[t]) * scale);
    const double w = out[t];
    s[0] += w * w;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Σ (x[t] − y[t])² in float64 for a float64 row x and a float32 row y: 16 partial sums (t mod 16), four
// independent add chains so the loop is not bound by the add latency.
BIASFAST_AVX2_NO_FMA inline double sq_distance(const double* x, const float* y, int64_t d) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16) {
    for (int u = 0; u < 4; ++u) {
      const __m256d v = _mm256_sub_pd(_mm256_loadu_pd(x + t + 4 * u), _mm256_cvtps_pd(_mm_loadu_ps(y + t + 4 * u)));
      acc[u] = _mm256_add_pd(acc[u], _mm256_mul_pd(v, v));
    }
  }
  for (; t + 4 <= d; t += 4) {
    const __m256d v = _mm256_sub_pd(_mm256_loadu_pd(x + t), _mm256_cvtps_pd(_mm_loadu_ps(y + t)));
    acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(v, v));
  }
  alignas(32) double s[4];
  _mm256_store_pd(s, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  for (; t < d; ++t) {
    const double v = x[t] - static_cast<double>(y[t]);
    s[0] += v * v;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// (x[0..4) − (y[0..4) − shift) / norm)², lane by lane.
BIASFAST_AVX2_NO_FMA inline __m256d affine_term(const double* x, const float* y, __m256d shift, __m256d norm) {
  const __m256d u = _mm256_div_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(y)), shift), norm);
  const __m256d v = _mm256_sub_pd(_mm256_loadu_pd(x), u);
  return _mm256_mul_pd(v, v);
}

// Σ (x[t] − (y[t] − shift) / norm)² in float64 (summed as sq_distance): a transformed float64 query row x
// against a float32 reference row y under its cosine / pearson transform.
BIASFAST_AVX2_NO_FMA inline double sq_distance_affine(const double* x, const float* y, double shift, double norm,
                                                      int64_t d) {
  const __m256d vshift = _mm256_set1_pd(shift), vnorm = _mm256_set1_pd(norm);
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t t = 0;
  for (; t + 16 <= d; t += 16)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_add_pd(acc[u], affine_term(x + t + 4 * u, y + t + 4 * u, vshift, vnorm));
  for (; t + 4 <= d; t += 4) acc[0] = _mm256_add_pd(acc[0], affine_term(x + t, y + t, vshift, vnorm));
  alignas(32) double s[4];
  _mm256_store_pd(s, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  for (; t < d; ++t) {
    const double v = x[t] - (static_cast<double>(y[t]) - shift) / norm;
    s[0] += v * v;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Transpose the 8 × 8 block held in r (row i in r[i]) in place.
BIASFAST_AVX2_NO_FMA inline void transpose_8x8(__m256 (&r)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0–3 (h = 0) and 4–7 (h = 1)
    s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}

// Write features [0, kc) of the W rows rows[i · stride + ·] as one panel block out[t · W + i] (W a multiple of 8).
template <int64_t W>
BIASFAST_AVX2_NO_FMA inline void store_panel(const float* rows, int64_t stride, int64_t kc, float* out) {
  static_assert(W % 8 == 0, "panels of whole 8-row groups");
  int64_t t = 0;
  for (; t + 8 <= kc; t += 8) {
    for (int64_t g = 0; g < W; g += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows + (g + i) * stride + t);
      transpose_8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (t + i) * W + g, r[i]);
    }
  }
  for (; t < kc; ++t)
    for (int64_t i = 0; i < W; ++i) out[t * W + i] = rows[i * stride + t];
}

}  // namespace biasfast
