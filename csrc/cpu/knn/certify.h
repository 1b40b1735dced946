// The exact answer of the CPU kNN from the scan's candidates: each query's candidates re-ranked by exact distance,
// and the answer certified (no reference left out can beat the k-th, given a rigorous bound on the scan's
// rounding); brute force with exact distances for queries that no wider scan can settle.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/knn/exact.h"
#include "cpu/knn/heap.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/queries.h"

namespace biasfast {

// Rigorous bound on the rounding error of a query's approximate distances (‖x'‖² + ‖y'‖² − 2·x'·y' in scalar_t
// against the exact distance of the untransformed rows), from the query's ‖x'‖² and max ‖y'‖ over the references.
template <typename scalar_t>
double rounding_bound(int64_t d, double query_norm_sq, double max_ref_norm) {
  const double u = std::numeric_limits<scalar_t>::epsilon() / 2;
  const double n = static_cast<double>(d + 8);
  const double gamma = 1.01 * (n * u / (1 - n * u) + 8 * u);
  return gamma * std::pow(std::sqrt(query_norm_sq) + max_ref_norm, 2);
}

// Each query's k exact squared (transformed) distances, ascending, and their global reference indices (+inf and
// −1 past the eligible references).
struct Neighbours {
  at::Tensor dist, index;

  Neighbours(int64_t nq, int64_t k) : dist(at::empty({nq, k}, at::kDouble)), index(at::empty({nq, k}, at::kLong)) {}

  double kth(int64_t i) const { return dist.data_ptr<double>()[(i + 1) * dist.size(1) - 1]; }

  void write_row(int64_t i, const std::vector<std::pair<double, int64_t>>& exact) {
    const int64_t k = dist.size(1);
    double* d = dist.data_ptr<double>() + i * k;
    int64_t* idx = index.data_ptr<int64_t>() + i * k;
    for (int64_t c = 0; c < k; ++c) {
      const bool valid = c < static_cast<int64_t>(exact.size());
      d[c] = valid ? exact[c].first : std::numeric_limits<double>::infinity();
      idx[c] = valid ? exact[c].second : -1;
    }
  }
};

// Exact distances of the candidates, sorted, into `out`; returns the queries whose answer could not be certified.
template <typename scalar_t, typename ref_t>
std::vector<int64_t> rerank_and_certify(const Problem& problem, const PreparedQueries<scalar_t>& queries,
                                        Candidates<scalar_t>& candidates,
                                        const ExactDistances<scalar_t, ref_t>& exact_to, double max_ref_norm,
                                        Neighbours& out) {
  const int64_t nq = problem.nq, k = problem.k;
  std::vector<char> failed(nq, 0);
  at::parallel_for(0, nq, 8, [&](int64_t begin, int64_t end) {
    std::vector<double> row(problem.d);
    std::vector<std::pair<double, int64_t>> exact;
    for (int64_t i = begin; i < end; ++i) {
      const Entry<scalar_t>* heap = candidates.heap_entries(i);
      const int64_t size = candidates.sizes[i];
      exact.clear();
      for (int64_t c = 0; c < size; ++c) {
        exact.emplace_back(exact_to(i, heap[c].index - problem.offset, row.data()), heap[c].index);
      }
      std::sort(exact.begin(), exact.end());
      out.write_row(i, exact);
      // Certified when every eligible reference was a candidate, or no non-candidate can beat the k-th.
      const bool all_seen = size >= problem.nr - (problem.exclude_self && problem.self_in_range(i) ? 1 : 0);
      if (!all_seen) {
        // Every reference left out has an approximate value at or above the heap's final threshold. (A recheck's
        // range holding fewer than k references cannot happen with a sound limit; it fails safely.)
        const double worst = queries.norms[i] + static_cast<double>(candidates.heap(i).threshold());
        const bool too_few = static_cast<int64_t>(exact.size()) < k;
        const double bound = rounding_bound<scalar_t>(problem.d, queries.norms[i], max_ref_norm);
        if (too_few || !(worst - bound > exact[k - 1].first)) failed[i] = 1;
      }
    }
  });
  std::vector<int64_t> list;
  for (int64_t i = 0; i < nq; ++i)
    if (failed[i]) list.push_back(i);
  return list;
}

// Exact search over every reference for `queries_to_search`, into `out`.
template <typename scalar_t, typename ref_t>
void brute_force(const Problem& problem, const ExactDistances<scalar_t, ref_t>& exact_to,
                 const std::vector<int64_t>& queries_to_search, Neighbours& out) {
  if (queries_to_search.empty()) return;
  const int64_t k = problem.k;
  at::parallel_for(0, static_cast<int64_t>(queries_to_search.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> row(problem.d);
    std::vector<std::pair<double, int64_t>> best;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = queries_to_search[b];
      best.clear();
      for (int64_t j = 0; j < problem.nr; ++j) {
        const int64_t jg = j + problem.offset;
        if (jg == problem.self_index(i)) continue;
        const std::pair<double, int64_t> cand{exact_to(i, j, row.data()), jg};
        if (static_cast<int64_t>(best.size()) < k) {
          best.push_back(cand);
          std::push_heap(best.begin(), best.end());
        } else if (cand < best.front()) {
          std::pop_heap(best.begin(), best.end());
          best.back() = cand;
          std::push_heap(best.begin(), best.end());
        }
      }
      std::sort_heap(best.begin(), best.end());
      out.write_row(i, best);
    }
  });
}

}  // namespace biasfast
