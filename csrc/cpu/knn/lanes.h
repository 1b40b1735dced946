// How the float32 kernels spread a scan over the threads. Lanes: one per thread, each with its own tile workspace
// and its own heaps (lane 0: the search's heaps; the others merged into them at the end), so a search is one
// parallel region with no barrier per tile. The references are cut into equal tiles (their count a multiple of the
// lanes) that the lanes claim in order, so a core slowed by a neighbour does not hold the others up; the merged
// heaps are the same whichever lane scanned a tile. With few references and many queries one lane scans each tile
// in parallel over query blocks instead (plan.h: lane_count).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/knn/fused.h"
#include "cpu/knn/heap.h"
#include "cpu/knn/pack.h"
#include "cpu/knn/plan.h"
#include "cpu/knn/problem.h"

namespace biasfast {

// The heaps each lane scans into; every query keeps its limit in every lane.
class LaneHeaps {
 public:
  LaneHeaps(Candidates<float>& result, int64_t lanes, int64_t nq)
      : result_(result), nq_(nq), lanes_(lanes), entries_((lanes - 1) * nq * result.capacity),
        sizes_((lanes - 1) * nq, 0) {}

  int64_t capacity() const { return result_.capacity; }
  const float* limits() const { return result_.limits.data(); }
  // Lane `lane`'s heaps: query i's at entries(lane) + i · capacity(), its size at sizes(lane)[i].
  Entry<float>* entries(int64_t lane) {
    return lane == 0 ? result_.entries.data() : entries_.data() + (lane - 1) * nq_ * result_.capacity;
  }
  int64_t* sizes(int64_t lane) { return lane == 0 ? result_.sizes.data() : sizes_.data() + (lane - 1) * nq_; }
  HeapView<float> heap(int64_t lane, int64_t i) {
    return {entries(lane) + i * capacity(), capacity(), sizes(lane) + i, result_.limits[i]};
  }

  // Every other lane's heaps into lane 0's, lane by lane.
  void merge() {
    for (int64_t lane = 1; lane < lanes_; ++lane)
      merge_heaps(result_.entries.data(), result_.sizes.data(), entries(lane), sizes(lane), nq_, capacity());
  }

 private:
  Candidates<float>& result_;
  int64_t nq_, lanes_;
  std::vector<Entry<float>> entries_;  // lanes 1..
  std::vector<int64_t> sizes_;
};

// Scans every reference in `lanes` lanes, tiles of at most `tile` rows packed by `packer` in 16-row panels with
// depth blocks of `step`; per_tile(lane, j0, padded, panels, panel_norms) scans one packed tile, inside the lane's
// thread. Reports a bad reference row (the first, as a serial scan would); returns max ‖y'‖ over the references.
template <typename ref_t, typename PerTile>
double scan_in_lanes(const Problem& problem, ReferencePacker<float, ref_t>& packer, LaneHeaps& heaps, int64_t lanes,
                     int64_t tile, int64_t step, PerTile per_tile) {
  const int64_t nr = problem.nr, d = problem.d;
  tile = equal_lane_tile(nr, tile, lanes);
  at::Tensor workspace = at::empty({lanes * (tile * d + tile)}, at::kFloat);
  std::vector<int64_t> lane_bad(lanes, -1);
  std::vector<double> lane_max(lanes, 0.0);
  std::atomic<int64_t> next_tile{0};
  std::atomic<bool> stop{false};  // a bad row was found: claim no more tiles
  auto scan_lane = [&](int64_t lane) {
    float* panels = workspace.data_ptr<float>() + lane * (tile * d + tile);
    float* panel_norms = panels + tile * d;
    while (!stop) {
      const int64_t j0 = next_tile++ * tile;
      if (j0 >= nr) return;
      const int64_t rows = std::min(tile, nr - j0), padded = (rows + kPanel - 1) / kPanel * kPanel;
      lane_bad[lane] = packer.pack_tile(j0, rows, kPanel, step, padded, panels, panel_norms, &lane_max[lane]);
      if (lane_bad[lane] >= 0) {
        stop = true;
        return;
      }
      per_tile(lane, j0, padded, panels, panel_norms);
    }
  };
  if (lanes == 1) {
    scan_lane(0);
  } else {
    at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t lane = begin; lane < end; ++lane) scan_lane(lane);
    });
  }
  // Tiles are claimed in order and packed whole, so every tile before a bad one was checked: the least bad row
  // over the lanes is the global first.
  int64_t first_bad = -1;
  for (int64_t bad : lane_bad)
    if (bad >= 0 && (first_bad < 0 || bad < first_bad)) first_bad = bad;
  packer.check_rows(first_bad);
  heaps.merge();
  return std::sqrt(*std::max_element(lane_max.begin(), lane_max.end()));
}

// Runs scan_blocks(begin, end) over query blocks [0, blocks) of one tile: in parallel where one lane scans each
// tile, else in the calling lane's thread.
template <typename ScanBlocks>
void for_query_blocks(int64_t lanes, int64_t blocks, ScanBlocks scan_blocks) {
  if (lanes == 1) at::parallel_for(0, blocks, 1, scan_blocks); else scan_blocks(0, blocks);
}

}  // namespace biasfast
