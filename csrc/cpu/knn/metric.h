// The metrics of the CPU kNN and the one rule that turns each into squared L2: a per-row affine transform
// (centring for pearson, scaling to unit norm for cosine / pearson), shared by the query and reference sides,
// the packed and the exact rows.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "common/checks.h"
#include "cpu/knn/rows.h"

namespace biasfast {

enum class Metric { SqEuclidean, L2, Cosine, Pearson };

inline Metric parse_metric(const std::string& name) {
  if (name == "sqeuclidean") return Metric::SqEuclidean;
  if (name == "l2") return Metric::L2;
  if (name == "cosine") return Metric::Cosine;
  if (name == "pearson") return Metric::Pearson;
  BIASFAST_CHECK_ARG(false, "metric", "unknown metric '", name, "' (expected l2, sqeuclidean, cosine or pearson)");
  return Metric::L2;
}

inline bool is_l2(Metric metric) { return metric == Metric::SqEuclidean || metric == Metric::L2; }

// Per-row affine transform of a metric: row' = (row − shift_row − center) · scale_row, in float64.
// The exact distances divide by the norm (correctly rounded, so parallel rows normalise identically).
struct RowTransform {
  double shift = 0.0;
  double norm = 1.0;
  double scale = 1.0;  // 1 / norm, for the approximate candidates
};

// Shift/scale of one row for the metric; false where it is undefined (a zero or constant row).
template <typename row_t>
bool try_row_transform(const row_t* row, int64_t d, Metric metric, RowTransform* tr) {
  *tr = RowTransform{};
  if (is_l2(metric)) return true;
  if (metric == Metric::Pearson) tr->shift = row_sum(row, d) / static_cast<double>(d);
  const double ss = row_sum_of_squares(row, tr->shift, d);
  if (!(ss > 0)) return false;
  tr->norm = std::sqrt(ss);
  tr->scale = 1.0 / tr->norm;
  return true;
}

// Shift/scale of one row for the metric; throws (naming the tensor and global row) where undefined.
inline RowTransform row_transform(const double* row, int64_t d, Metric metric, const char* name,
                                  int64_t global_row) {
  RowTransform tr;
  BIASFAST_CHECK_ARG(try_row_transform(row, d, metric, &tr), name, "row ", global_row,
                     metric == Metric::Pearson ? " is constant: its pearson distance is undefined"
                                               : " has zero norm: its cosine distance is undefined");
  return tr;
}

// Exact distance (in transformed squared-L2 units) between two rows given in float64.
inline double exact_distance(const double* x, const RowTransform& tx, const double* y, const RowTransform& ty,
                             int64_t d) {
  if (tx.shift == 0.0 && ty.shift == 0.0 && tx.norm == 1.0 && ty.norm == 1.0)
    return sum_of_squares(d, [&](int64_t t) { return x[t] - y[t]; });
  return sum_of_squares(d, [&](int64_t t) { return (x[t] - tx.shift) / tx.norm - (y[t] - ty.shift) / ty.norm; });
}

}  // namespace biasfast
