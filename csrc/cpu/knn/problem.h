// What one search of the CPU kNN is asked, read by every stage: sizes, metric, index offset, self exclusion and
// the workspace budget, and the caller's reference rows in any layout. A recheck is a new Problem over some of
// the queries, so each stage sees one query set whatever round it is in.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/knn/metric.h"

namespace biasfast {

// The caller's reference rows, any strides, read as float64.
template <typename ref_t>
struct StridedRows {
  const ref_t* data;
  int64_t rows, d, s0, s1;

  void read(int64_t row, double* out) const {
    const ref_t* p = data + row * s0;
    if (s1 == 1) {
      for (int64_t t = 0; t < d; ++t) out[t] = static_cast<double>(p[t]);
    } else {
      for (int64_t t = 0; t < d; ++t) out[t] = static_cast<double>(p[t * s1]);
    }
  }
};

struct Problem {
  int64_t nq, nr, d, k;
  Metric metric;
  int64_t offset;  // global index of reference row 0
  bool exclude_self;
  int64_t workspace_bytes;
  std::vector<int64_t> ids;  // each query's row in the caller's query set (empty: identity), for exclude_self

  int64_t query_id(int64_t i) const { return ids.empty() ? i : ids[i]; }
  // The global reference index query i must skip, or −1.
  int64_t self_index(int64_t i) const { return exclude_self ? query_id(i) : -1; }
  // Whether query i's own row is among the references (so it has one eligible reference fewer).
  bool self_in_range(int64_t i) const { return query_id(i) >= offset && query_id(i) < offset + nr; }
};

}  // namespace biasfast
