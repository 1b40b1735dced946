// The reference side of the CPU kNN scan: one workspace tile of reference rows at a time, checked for NaN / Inf,
// transformed as the metric says (with the queries' center), rounded to the scan's precision and laid out as the
// kernels read it, with each row's ‖y'‖² (padding rows: zeros, norm +inf).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/knn/fused.h"
#include "cpu/knn/metric.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/rows.h"

namespace biasfast {

template <typename scalar_t, typename ref_t>
class ReferencePacker {
 public:
  ReferencePacker(const Problem& problem, const StridedRows<ref_t>& ref, const std::vector<double>& center)
      : problem_(problem), ref_(ref), center_(center) {
    // Contiguous float32 rows on an AVX2 CPU are packed (and later re-ranked) straight from the caller's rows.
    direct_ = std::is_same_v<scalar_t, float> && std::is_same_v<ref_t, float> && ref_.s1 == 1 && use_avx2();
    if (direct_ && !is_l2(problem_.metric)) transforms_.resize(ref_.rows);
  }

  // Whether the rows go through the rows.h fast paths; then transforms() holds each packed row's transform.
  bool direct() const { return direct_; }
  // The cosine / pearson transforms of the packed rows (direct rows only: the others are recomputed when needed).
  const std::vector<RowTransform>& transforms() const { return transforms_; }

  // Pack rows [j0, j0 + rows) into one tile: transform to scalar_t, norms, NaN/Inf check. The layout is that of
  // pack_blocked: w-row panels in depth blocks of `step` features, `padded` rows (a multiple of w; the rows past
  // `rows` are zeros with norm +inf); w = 1 with step = d is row-major. *max_norm takes the largest ‖y'‖².
  // Returns the first bad row (local index, from reference row 0), or −1; the caller reports it (check_rows).
  int64_t pack_tile(int64_t j0, int64_t rows, int64_t w, int64_t step, int64_t padded, scalar_t* packed,
                    scalar_t* norms, double* max_norm) {
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<ref_t, float>) {
      if (direct_) {
        TORCH_INTERNAL_ASSERT(w == kPanel, "the float32 kernels pack 16-row panels");
        return pack_panels(j0, rows, step, padded, packed, norms, max_norm);
      }
    }
    const int64_t d = problem_.d;
    std::vector<int64_t> bad_rows(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
    std::vector<double> max_norms(at::get_num_threads() + 1, 0.0);
    at::parallel_for(0, padded / w, std::max<int64_t>(1, 64 / w), [&](int64_t begin, int64_t end) {
      std::vector<double> row(d);
      std::vector<scalar_t> values(d);
      const int tid = at::get_thread_num();
      for (int64_t r = begin * w; r < end * w; ++r) {
        if (r < rows) {
          ref_.read(j0 + r, row.data());
          if (first_non_finite_row(row.data(), 1, d) >= 0) {
            bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            continue;
          }
          const RowTransform tr = row_transform(row.data(), d, problem_.metric, "ref", j0 + r + problem_.offset);
          for (int64_t t = 0; t < d; ++t)
            values[t] = static_cast<scalar_t>((row[t] - tr.shift - center_[t]) * tr.scale);
          const double norm = sum_of_squares(d, [&](int64_t t) { return static_cast<double>(values[t]); });
          norms[r] = static_cast<scalar_t>(norm);
          max_norms[tid] = std::max(max_norms[tid], norm);
        } else {
          std::fill(values.begin(), values.end(), scalar_t(0));
          norms[r] = std::numeric_limits<scalar_t>::infinity();
        }
        for (int64_t pc = 0; pc < d; pc += step) {
          const int64_t kc = std::min(step, d - pc);
          scalar_t* dst = packed + pc * padded + r / w * w * kc + r % w;
          for (int64_t t = 0; t < kc; ++t) dst[t * w] = values[pc + t];
        }
      }
    });
    return first_bad(bad_rows, max_norms, max_norm);
  }

  // Reports the bad row `bad` (local index; −1: none): NaN / Inf, or else its undefined transform.
  void check_rows(int64_t bad) const {
    if (bad < 0) return;
    const int64_t d = problem_.d;
    std::vector<double> row(d);
    ref_.read(bad, row.data());
    BIASFAST_CHECK_ARG(first_non_finite_row(row.data(), 1, d) < 0, "ref", "contains NaN or Inf (first bad row ",
                       bad + problem_.offset, ")");
    row_transform(row.data(), d, problem_.metric, "ref", bad + problem_.offset);  // throws: undefined transform
  }

 private:
  // pack_tile for direct rows: the same packed values, computed with AVX2 one 16-row panel at a time (rows.h)
  // instead of through a float64 copy and a strided scatter. Keeps each row's cosine / pearson transform for the
  // re-rank. A bad row is a NaN / Inf or an undefined transform (check_rows tells which).
  int64_t pack_panels(int64_t j0, int64_t rows, int64_t step, int64_t padded, float* packed, float* norms,
                      double* max_norm) {
    const int64_t d = problem_.d;
    std::vector<int64_t> bad_rows(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
    std::vector<double> max_norms(at::get_num_threads() + 1, 0.0);
    at::parallel_for(0, padded / kPanel, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> panel(kPanel * d);
      const int tid = at::get_thread_num();
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t i = 0; i < kPanel; ++i) {
          const int64_t r = p * kPanel + i;
          float* values = panel.data() + i * d;
          const float* row = r < rows ? ref_.data + (j0 + r) * ref_.s0 : nullptr;
          if (row == nullptr || has_non_finite(row, d)) {
            if (row != nullptr) bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            std::fill(values, values + d, 0.0f);
            norms[r] = std::numeric_limits<float>::infinity();
            continue;
          }
          RowTransform tr;
          if (!try_row_transform(row, d, problem_.metric, &tr)) {
            bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            continue;
          }
          if (!is_l2(problem_.metric)) transforms_[j0 + r] = tr;
          const double norm = transform_row(row, tr.shift, center_.data(), tr.scale, d, values);
          norms[r] = static_cast<float>(norm);
          max_norms[tid] = std::max(max_norms[tid], norm);
        }
        for (int64_t pc = 0; pc < d; pc += step) {
          const int64_t kc = std::min(step, d - pc);
          store_panel<kPanel>(panel.data() + pc, d, kc, packed + pc * padded + p * kPanel * kc);
        }
      }
    });
    return first_bad(bad_rows, max_norms, max_norm);
  }

  // Folds the threads' findings: the largest norm into *max_norm; returns the least bad row, or −1.
  static int64_t first_bad(const std::vector<int64_t>& bad_rows, const std::vector<double>& max_norms,
                           double* max_norm) {
    for (double m : max_norms) *max_norm = std::max(*max_norm, m);
    const int64_t bad = *std::min_element(bad_rows.begin(), bad_rows.end());
    return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
  }

  const Problem& problem_;
  StridedRows<ref_t> ref_;
  const std::vector<double>& center_;
  bool direct_ = false;
  std::vector<RowTransform> transforms_;
};

}  // namespace biasfast
