// Fused inner products + running top-k for small feature sizes (d <= kFusedMaxDim), AVX2/FMA.
// A 6-query × 16-reference register tile accumulates its dot products over all d, then its 96 values
// ‖y‖² − 2·x·y are compared with the six queries' heap thresholds in registers: nothing is written to memory
// unless a value beats a threshold. Compiled for AVX2 per function, used only where the CPU has it.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/isa.h"
#include "cpu/knn/heap.h"

namespace biasfast {

constexpr int64_t kFusedMaxDim = 256;
constexpr int64_t kPanel = 16;  // references per packed panel: [t][16] floats
constexpr int64_t kRows = 6;    // queries per register tile

// Repack rows [r0, r1) of a row-major n × d matrix into W-row panels, blocked by depth: features
// [pc, pc + kc) (pc a multiple of step, kc = min(step, d − pc)) of row i go to
// out[pc · padded + (i / W) · W · kc + (t − pc) · W + i % W] (padded: the panel rows in all, a multiple of W),
// so each depth block of each panel is one contiguous stream. Rows from n on are zeros. step = d gives
// plain panels [p][d][W].
template <int64_t W>
inline void pack_blocked(const float* rows, int64_t n, int64_t d, int64_t step, int64_t padded, int64_t r0,
                         int64_t r1, float* out) {
  for (int64_t pc = 0; pc < d; pc += step) {
    const int64_t kc = std::min(step, d - pc);
    float* block = out + pc * padded;
    for (int64_t i = r0; i < r1; ++i) {
      float* dst = block + i / W * W * kc + i % W;
      if (i < n) {
        for (int64_t t = 0; t < kc; ++t) dst[t * W] = rows[i * d + pc + t];
      } else {
        for (int64_t t = 0; t < kc; ++t) dst[t * W] = 0.0f;
      }
    }
  }
}

// The thresholds select_tile_6x16 starts from: each heap's, and −inf for the rows r ≥ rows of a partial block.
inline void start_thresholds(const HeapView<float>* heaps, int64_t rows, float (&thr)[kRows]) {
  for (int64_t r = 0; r < kRows; ++r) {
    thr[r] = r < rows ? heaps[r].threshold() : -std::numeric_limits<float>::infinity();
  }
}

// Compare a finished 6 × 16 register tile of inner products, as ‖y‖² − 2·x·y, with the queries' thresholds
// thr[r] (kept up to date; thr[r] = −inf for rows r ≥ `rows`, so they never hit) and push the values that beat
// them; references base .. base + 15, in index order. The common case (no hit) stays in registers: the values
// overwrite acc and only a tile with a hit is written to memory.
BIASFAST_AVX2 inline void select_tile_6x16(__m256 (&acc)[kRows][2], const float* norms, int64_t rows, int64_t base,
                                           const int64_t* self, HeapView<float>* heaps, float* thr) {
  const __m256 minus2 = _mm256_set1_ps(-2.0f);
  __m256 any = _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int64_t r = 0; r < kRows; ++r) {
    acc[r][0] = _mm256_fmadd_ps(minus2, acc[r][0], _mm256_loadu_ps(norms));
    acc[r][1] = _mm256_fmadd_ps(minus2, acc[r][1], _mm256_loadu_ps(norms + 8));
    // NaN (float32 overflow of huge rows) can hide a hit here, but then the rounding bound is infinite and no
    // such query is certified: it ends in brute force.
    const __m256 low = _mm256_min_ps(acc[r][0], acc[r][1]);
    any = _mm256_or_ps(any, _mm256_cmp_ps(low, _mm256_broadcast_ss(thr + r), _CMP_LT_OQ));
  }
  if (_mm256_testz_ps(any, any)) return;  // the common case once the heaps are full
  alignas(32) float values[kRows][kPanel];  // constant indices only: acc stays in registers on the common path
#pragma GCC unroll 6
  for (int64_t r = 0; r < kRows; ++r) {
    _mm256_store_ps(values[r], acc[r][0]);
    _mm256_store_ps(values[r] + 8, acc[r][1]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 th = _mm256_broadcast_ss(thr + r);
    unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(values[r]), th, _CMP_LT_OQ)) |
                    _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(values[r] + 8), th, _CMP_LT_OQ)) << 8;
    for (; mask != 0; mask &= mask - 1) {  // lanes in increasing index order
      const int lane = __builtin_ctz(mask);
      const int64_t j = base + lane;
      if (values[r][lane] < thr[r] && j != self[r]) {
        heaps[r].push({values[r][lane], j});
        thr[r] = heaps[r].threshold();
      }
    }
  }
}

// The 6 × 16 register tile of both kNN kernels (this one and packed.h): acc[r] = Σ_{t < kc} x(r, t) · b[t][0..16),
// b a [kc][16] reference panel and x(r, t) a pointer to query r's feature t.
template <typename QueryAt>
BIASFAST_AVX2 inline void tile_6x16(QueryAt x, const float* b, int64_t kc, __m256 (&acc)[kRows][2]) {
#pragma GCC unroll 6
  for (int64_t r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t t = 0; t < kc; ++t) {
    const __m256 b0 = _mm256_loadu_ps(b + t * kPanel), b1 = _mm256_loadu_ps(b + t * kPanel + 8);
#pragma GCC unroll 6
    for (int64_t r = 0; r < kRows; ++r) {
      const __m256 v = _mm256_broadcast_ss(x(r, t));
      acc[r][0] = _mm256_fmadd_ps(v, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(v, b1, acc[r][1]);
    }
  }
}

// For queries q[0..rows) (row-major, stride d) and every panel: push ‖y‖² − 2·x·y into the queries' heaps.
BIASFAST_AVX2 inline void fused_scan_6x16(const float* const* q, int64_t rows, const float* panels, const float* norms,
                                          int64_t panels_count, int64_t d, int64_t base, const int64_t* self,
                                          HeapView<float>* heaps) {
  float thr[kRows];
  start_thresholds(heaps, rows, thr);
  for (int64_t p = 0; p < panels_count; ++p) {
    __m256 acc[kRows][2];
    tile_6x16([q](int64_t r, int64_t t) { return q[r] + t; }, panels + p * d * kPanel, d, acc);
    select_tile_6x16(acc, norms + p * kPanel, rows, base + p * kPanel, self, heaps, thr);
  }
}

}  // namespace biasfast
