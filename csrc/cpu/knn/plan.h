// Sizes and schedules of the CPU kNN, decided apart from the code that follows them: heap capacities, how many
// lanes scan the references and how big their tiles are, and what fits the workspace budget.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "cpu/knn/fused.h"
#include "cpu/knn/packed.h"

namespace biasfast {

// Heap capacity of a first pass: k plus a margin that the k-th neighbour's rounding ties rarely outgrow.
inline int64_t first_pass_candidates(int64_t k, int64_t nr) { return std::min(k + std::max<int64_t>(8, k / 4), nr); }

// The wider heaps of a recheck after `capacity`, or 0 where brute force is the better next step: they would not
// widen (every reference is already a candidate) or every lane's heaps of the `failed` queries would not fit.
inline int64_t recheck_candidates(int64_t capacity, int64_t failed, int64_t nr, int64_t entry_bytes,
                                  int64_t workspace_bytes) {
  const int64_t wider = std::min(nr, 4 * capacity);
  const int64_t heap_bytes = failed * wider * at::get_num_threads() * entry_bytes;
  return wider > capacity && heap_bytes <= workspace_bytes ? wider : 0;
}

// Lanes for a search whose parallel tasks are `blocks` query blocks and whose tiles hold `tile` of nr references.
inline int64_t lane_count(int64_t blocks, int64_t tile, int64_t nr) {
  const int64_t threads = at::get_num_threads();
  if (blocks >= threads && nr < threads * tile) return 1;
  return std::max<int64_t>(1, std::min(threads, (nr + kPanel - 1) / kPanel));
}

// References per tile of the fused kernel: a tile of packed d-feature rows stays in L2 (256 KB).
inline int64_t fused_l2_tile(int64_t d) {
  return std::clamp<int64_t>((256 * 1024 / (d * 4)) / kPanel * kPanel, kPanel, 4096);
}

// The L2 tile, shrunk until every lane's tile of d + 1 floats per row (rows and norms) fits the workspace: on a
// many-core machine the lanes' L2 tiles alone can outgrow it (64 lanes × 256 KB = 16 MB).
inline int64_t fused_tile(int64_t lanes, int64_t d, int64_t workspace_bytes) {
  const int64_t fit = workspace_bytes / (4 * lanes * (d + 1)) / kPanel * kPanel;
  BIASFAST_CHECK_ARG(fit >= kPanel, "workspace_mb", "too small for feature size ", d, " (", workspace_bytes >> 20,
                     " MB holds fewer than ", kPanel, " packed references for each of ", lanes, " lanes)");
  return std::min(fused_l2_tile(d), fit);
}

// Tiles of at most `tile` references cut into equal ones, their count a multiple of the lanes: the rows of each.
inline int64_t equal_lane_tile(int64_t nr, int64_t tile, int64_t lanes) {
  const int64_t tiles = ((nr + tile - 1) / tile + lanes - 1) / lanes * lanes;
  return ((nr + tiles - 1) / tiles + kPanel - 1) / kPanel * kPanel;
}

// Reference rows per packed tile and per partial-sum block of the packed kernel.
struct PackedPlan {
  int64_t tile, block;
};

// The largest tile (at most what stays in L3) whose buffers fit the workspace: each lane a packed tile of
// tile × (d + 1) floats, each thread kMc × block partial sums (block = min(tile, kNc)) and one 16-row panel of
// packing scratch.
inline PackedPlan plan_packed(int64_t lanes, int64_t threads, int64_t d, int64_t workspace_bytes) {
  const int64_t floats = workspace_bytes / 4 - threads * kPanel * d;
  const int64_t l3_rows = std::max<int64_t>(kTileBytes / (4 * d), kNc) / kPanel * kPanel;
  const int64_t full_blocks = floats - threads * kMc * kNc;  // room left once the partial sums are full size
  int64_t tile = full_blocks >= lanes * kNc * (d + 1) ? full_blocks / (lanes * (d + 1))
                                                       : floats / (lanes * (d + 1) + threads * kMc);
  tile = std::min(tile, l3_rows) / kPanel * kPanel;
  BIASFAST_CHECK_ARG(tile >= kPanel, "workspace_mb", "too small for feature size ", d, " (", workspace_bytes >> 20,
                     " MB holds fewer than ", kPanel, " packed references per thread)");
  return {tile, std::min(tile, kNc)};
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
  BIASFAST_CHECK_ARG(need(qt, rt) <= budget, "workspace_mb", "too small for feature size ", d, " (",
                     budget_bytes >> 20, " MB holds fewer than 16 references with their inner products)");
  return {qt, rt, need(qt, rt)};
}

}  // namespace biasfast
