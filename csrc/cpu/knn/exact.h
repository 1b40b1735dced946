// Exact distances of the CPU kNN: query i to reference row j in float64 on the original inputs, in transformed
// squared-L2 units, the ground truth that re-ranking, certification and brute force compare.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/knn/metric.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/queries.h"
#include "cpu/knn/rows.h"

namespace biasfast {

template <typename scalar_t, typename ref_t>
class ExactDistances {
 public:
  // direct / ref_transforms: as the ReferencePacker that packed the rows reports them (direct rows are read in
  // place, with the transforms packing found; the others are read and transformed again).
  ExactDistances(const Problem& problem, const StridedRows<ref_t>& ref, const PreparedQueries<scalar_t>& queries,
                 bool direct, const std::vector<RowTransform>& ref_transforms)
      : problem_(problem), ref_(ref), queries_(queries), direct_(direct), ref_transforms_(ref_transforms) {}

  // Query i to reference row j (local index); row: d scratch doubles.
  double operator()(int64_t i, int64_t j, double* row) const {
    const int64_t d = problem_.d;
    const double* x = queries_.exact_row(i, d);
    if constexpr (std::is_same_v<ref_t, float>) {
      if (direct_) {
        const float* y = ref_.data + j * ref_.s0;
        if (is_l2(problem_.metric)) return sq_distance(x, y, d);
        return sq_distance_affine(x, y, ref_transforms_[j].shift, ref_transforms_[j].norm, d);
      }
    }
    ref_.read(j, row);
    const RowTransform tr = row_transform(row, d, problem_.metric, "ref", j + problem_.offset);
    return exact_distance(x, queries_.transforms[i], row, tr, d);
  }

 private:
  const Problem& problem_;
  StridedRows<ref_t> ref_;
  const PreparedQueries<scalar_t>& queries_;
  bool direct_;
  const std::vector<RowTransform>& ref_transforms_;
};

}  // namespace biasfast
