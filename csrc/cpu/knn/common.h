// Pieces of the CPU kNN search shared by its kernels: metric names, running top-k heaps, tile planning.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "common/checks.h"

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

template <typename value_t>
struct Entry {
  value_t value = std::numeric_limits<value_t>::infinity();
  int64_t index = -1;
};

template <typename value_t>
inline bool worse(const Entry<value_t>& a, const Entry<value_t>& b) {
  return a.value > b.value || (a.value == b.value && a.index > b.index);
}

// A max-heap (by value, then index) of fixed capacity over caller-owned storage: the running top-k of a query.
// Values at or above `limit` are not wanted (a recheck knows they cannot matter), even while the heap is not full.
template <typename value_t>
struct HeapView {
  Entry<value_t>* data;
  int64_t capacity;
  int64_t* size;
  value_t limit = std::numeric_limits<value_t>::infinity();

  value_t threshold() const { return *size < capacity ? limit : std::min(limit, data[0].value); }

  void push(Entry<value_t> e) {
    if (*size < capacity) {
      int64_t c = (*size)++;
      while (c > 0) {
        const int64_t p = (c - 1) / 2;
        if (!worse(e, data[p])) break;
        data[c] = data[p];
        c = p;
      }
      data[c] = e;
      return;
    }
    if (!worse(data[0], e)) return;
    int64_t c = 0;
    for (;;) {
      int64_t child = 2 * c + 1;
      if (child >= capacity) break;
      if (child + 1 < capacity && worse(data[child + 1], data[child])) ++child;
      if (!worse(data[child], e)) break;
      data[c] = data[child];
      c = child;
    }
    data[c] = e;
  }
};

// Feed one query's row of ‖y‖² − 2·x·y values (references base .. base + n − 1, scanned in increasing index
// order, so a value equal to the threshold never wins its tie) into its heap.
template <typename value_t>
inline void select_row(HeapView<value_t>& heap, const value_t* ip, const value_t* norms, int64_t n, int64_t base,
                       int64_t self) {
  value_t threshold = heap.threshold();
  for (int64_t j = 0; j < n; ++j) {
    const value_t v = norms[j] - 2 * ip[j];
    if (v < threshold && base + j != self) {
      heap.push({v, base + j});
      threshold = heap.threshold();
    }
  }
}

struct TilePlan {
  int64_t query_tile, ref_tile, workspace_elements;
};

// Largest tiles (queries × references) whose packed references, norms and inner-product block fit the budget.
inline TilePlan plan_tiles(int64_t nq, int64_t nr, int64_t d, int64_t elem_size, int64_t budget_bytes) {
  const int64_t budget = std::max<int64_t>(budget_bytes / elem_size, 1);
  int64_t qt = std::min<int64_t>(nq, 1024), rt = std::min<int64_t>(nr, 4096);
  auto need = [&](int64_t q, int64_t r) { return r * d + r + q * r; };
  while (need(qt, rt) > budget && (qt > 16 || rt > 16)) {
    if (rt >= qt && rt > 16) rt = (rt + 1) / 2; else qt = (qt + 1) / 2;
  }
  TORCH_CHECK_VALUE(need(qt, rt) <= budget || (qt <= 16 && rt <= 16), "biasfast: argument 'workspace_mb': ",
                    "too small for feature size ", d);
  return {qt, rt, need(qt, rt)};
}

}  // namespace biasfast
