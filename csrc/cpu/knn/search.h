// Exact k-nearest neighbours on the CPU, the driver of the stages.
//
// Candidates come from tiled inner products (‖y'‖² − 2·x'·y' on transformed float32 rows, never an nq × nr
// matrix; scan.h), kept in a running top-(k + margin) heap per query. They are then re-ranked with direct
// differences accumulated in float64 on the original inputs, and each query's answer is *certified*: the worst
// candidate's approximate distance, minus a rigorous bound on the inner-product rounding error, must exceed the
// k-th exact distance (certify.h). Queries that fail (genuine near-ties at the rounding scale, groups of
// duplicates) are searched again with four times the candidates, round after round, and by brute force with exact
// differences once the wider heaps would outgrow the workspace, so results always equal a float64 brute force up
// to ties.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/knn/certify.h"
#include "cpu/knn/exact.h"
#include "cpu/knn/heap.h"
#include "cpu/knn/pack.h"
#include "cpu/knn/plan.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/queries.h"
#include "cpu/knn/scan.h"

namespace biasfast {

// What a recheck of some queries of an earlier search carries over. Same center, so the rows transform (and
// round) exactly as they did there; limits: per query, the approximate value ‖y'‖² − 2·x'·y' above which a
// reference cannot be among its k nearest (from the earlier exact k-th distance).
struct Recheck {
  int64_t candidates = 0;  // heap capacity; 0: a first pass (plan.h: first_pass_candidates)
  std::vector<double> limits, center;
};

// Exact squared (transformed) distances and indices of every query of `problem` (query: its rows; ref: every
// reference row, as the caller gave them).
template <typename scalar_t, typename ref_t>
Neighbours exact_search(const at::Tensor& query, const at::Tensor& ref, const Problem& problem,
                        const Recheck& recheck = {}) {
  const StridedRows<ref_t> ref_rows{ref.data_ptr<ref_t>(), ref.size(0), ref.size(1), ref.stride(0), ref.stride(1)};
  const PreparedQueries<scalar_t> queries = prepare_queries<scalar_t>(query, problem, recheck.center);
  const int64_t capacity = recheck.candidates > 0 ? std::min(recheck.candidates, problem.nr)
                                                  : first_pass_candidates(problem.k, problem.nr);
  Candidates<scalar_t> candidates(problem.nq, capacity, recheck.limits);
  ReferencePacker<scalar_t, ref_t> packer(problem, ref_rows, queries.center);
  const double max_ref_norm = scan(problem, queries, packer, candidates);
  const ExactDistances<scalar_t, ref_t> exact_to(problem, ref_rows, queries, packer.direct(), packer.transforms());
  Neighbours out(problem.nq, problem.k);
  const std::vector<int64_t> failed = rerank_and_certify(problem, queries, candidates, exact_to, max_ref_norm, out);
  if (failed.empty()) return out;
  // Queries whose k-th neighbour is within rounding of their worst candidate (groups of near-duplicates, ties)
  // are searched again by the same kernels, collecting every reference that could still beat their k-th exact
  // distance into heaps four times wider (round after round while a range overflows them): far cheaper than
  // brute force, which is left for when the wider heaps would not fit the workspace.
  const int64_t wider = recheck_candidates(capacity, static_cast<int64_t>(failed.size()), problem.nr,
                                           static_cast<int64_t>(sizeof(Entry<scalar_t>)), problem.workspace_bytes);
  if (wider == 0) {
    brute_force(problem, exact_to, failed, out);
    return out;
  }
  Problem sub = problem;
  sub.nq = static_cast<int64_t>(failed.size());
  sub.ids.clear();
  Recheck next{wider, {}, queries.center};
  for (const int64_t i : failed) {
    sub.ids.push_back(problem.query_id(i));
    // A reference whose approximate value reaches this is farther than the k-th exact distance found here.
    const double bound = rounding_bound<scalar_t>(problem.d, queries.norms[i], max_ref_norm);
    next.limits.push_back(out.kth(i) - queries.norms[i] + 2 * bound);
  }
  const at::Tensor rows = at::tensor(failed, at::kLong);
  const Neighbours again = exact_search<scalar_t, ref_t>(query.index_select(0, rows), ref, sub, next);
  out.dist.index_copy_(0, rows, again.dist);
  out.index.index_copy_(0, rows, again.index);
  return out;
}

}  // namespace biasfast
