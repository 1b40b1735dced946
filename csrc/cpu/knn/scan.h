// The scan of the CPU kNN: the approximate value ‖y'‖² − 2·x'·y' of every reference for every query, fed into
// the queries' heaps, by one of three strategies chosen by precision, CPU and feature size: the fused register
// kernel (fused.h, small d), the cache-blocked packed kernel (packed.h, large d), or the BLAS (gemm.h, any d).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/isa.h"
#include "cpu/knn/fused.h"
#include "cpu/knn/gemm.h"
#include "cpu/knn/heap.h"
#include "cpu/knn/lanes.h"
#include "cpu/knn/pack.h"
#include "cpu/knn/packed.h"
#include "cpu/knn/plan.h"
#include "cpu/knn/problem.h"
#include "cpu/knn/queries.h"

namespace biasfast {

// Small d: register-tiled inner products fused with the selection, over 6-query tiles.
template <typename ref_t>
double scan_fused(const Problem& problem, const PreparedQueries<float>& queries, ReferencePacker<float, ref_t>& packer,
                  Candidates<float>& candidates) {
  const int64_t nq = problem.nq, d = problem.d;
  const int64_t blocks = (nq + kRows - 1) / kRows, lanes = lane_count(blocks, fused_l2_tile(d), problem.nr);
  const int64_t tile = fused_tile(lanes, d, problem.workspace_bytes);
  LaneHeaps heaps(candidates, lanes, nq);
  return scan_in_lanes(problem, packer, heaps, lanes, tile, d, [&](int64_t lane, int64_t j0, int64_t padded,
                                                                   const float* panels, const float* panel_norms) {
    for_query_blocks(lanes, blocks, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t i0 = block * kRows, count = std::min(kRows, nq - i0);
        const float* q[kRows];
        int64_t self[kRows];
        HeapView<float> row_heaps[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t qi = i0 + std::min(r, count - 1);
          q[r] = queries.packed_rows() + qi * d;
          self[r] = problem.self_index(qi);
          row_heaps[r] = heaps.heap(lane, qi);
        }
        fused_scan_6x16(q, count, panels, panel_norms, padded / kPanel, d, j0 + problem.offset, self, row_heaps);
      }
    });
  });
}

// Large d: cache-blocked packed micro-kernels fused with the selection, over kMc-query blocks.
template <typename ref_t>
double scan_packed(const Problem& problem, const PreparedQueries<float>& queries,
                   ReferencePacker<float, ref_t>& packer, Candidates<float>& candidates) {
  const int64_t nq = problem.nq, d = problem.d;
  const int64_t threads = at::get_num_threads();
  const int64_t step = depth_step(d), qpadded = (nq + kRows - 1) / kRows * kRows;
  at::Tensor qpanels = at::empty({qpadded * d}, at::kFloat);
  at::parallel_for(0, qpadded / kRows, 16, [&](int64_t begin, int64_t end) {
    pack_blocked<kRows>(queries.packed_rows(), nq, d, step, qpadded, begin * kRows, end * kRows,
                        qpanels.data_ptr<float>());
  });
  std::vector<int64_t> self_of(problem.exclude_self ? nq : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(self_of.size()); ++i) self_of[i] = problem.self_index(i);
  const int64_t qblocks = (nq + kMc - 1) / kMc, lanes = lane_count(qblocks, kNc, problem.nr);
  const PackedPlan plan = plan_packed(lanes, threads, d, problem.workspace_bytes);
  const int64_t cbuf = kMc * plan.block;
  at::Tensor cbufs = at::empty({threads * cbuf}, at::kFloat);
  LaneHeaps heaps(candidates, lanes, nq);
  return scan_in_lanes(problem, packer, heaps, lanes, plan.tile, step, [&](int64_t lane, int64_t j0,
                                                                           int64_t padded, const float* panels,
                                                                           const float* panel_norms) {
    for_query_blocks(lanes, qblocks, [&](int64_t begin, int64_t end) {
      float* cbuf_t = cbufs.data_ptr<float>() + at::get_thread_num() * cbuf;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i0 = b * kMc;
        const QueryBlock block{qpanels.data_ptr<float>(), qpadded, i0, std::min(kMc, nq - i0),
                               heaps.entries(lane) + i0 * heaps.capacity(), heaps.sizes(lane) + i0,
                               heaps.capacity(), problem.exclude_self ? self_of.data() + i0 : nullptr,
                               heaps.limits() + i0};
        packed_scan_block(block, panels, panel_norms, padded, 0, padded, d, j0 + problem.offset, plan.block, cbuf_t);
      }
    });
  });
}

// Any d: inner-product blocks through the BLAS (at::mm), then the selection.
template <typename scalar_t, typename ref_t>
double scan_gemm(const Problem& problem, const PreparedQueries<scalar_t>& queries,
                 ReferencePacker<scalar_t, ref_t>& packer, Candidates<scalar_t>& candidates) {
  const int64_t nq = problem.nq, nr = problem.nr, d = problem.d;
  const TilePlan plan = plan_tiles(nq, nr, d, sizeof(scalar_t), problem.workspace_bytes);
  at::Tensor workspace = at::empty({plan.workspace_elements}, at::CppTypeToScalarType<scalar_t>::value);
  scalar_t* packed = workspace.data_ptr<scalar_t>();
  scalar_t* norms = packed + plan.ref_tile * d;
  scalar_t* ip = norms + plan.ref_tile;
  double max_sq = 0;
  for (int64_t j0 = 0; j0 < nr; j0 += plan.ref_tile) {
    const int64_t rows = std::min(plan.ref_tile, nr - j0);
    packer.check_rows(packer.pack_tile(j0, rows, 1, d, rows, packed, norms, &max_sq));
    for (int64_t i0 = 0; i0 < nq; i0 += plan.query_tile) {
      const int64_t count = std::min(plan.query_tile, nq - i0);
      inner_products(queries.packed_rows() + i0 * d, packed, ip, count, rows, d);
      at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t qi = i0 + i;
          HeapView<scalar_t> heap = candidates.heap(qi);
          select_row(heap, ip + i * rows, norms, rows, j0 + problem.offset, problem.self_index(qi));
        }
      });
    }
  }
  return std::sqrt(max_sq);
}

// Scans every reference into `candidates`; returns max ‖y'‖ over the references (for the rounding bound).
template <typename scalar_t, typename ref_t>
double scan(const Problem& problem, const PreparedQueries<scalar_t>& queries, ReferencePacker<scalar_t, ref_t>& packer,
            Candidates<scalar_t>& candidates) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (use_avx2()) {
      if (problem.d <= kFusedMaxDim) {
        BIASFAST_MARK_AVX2_BODY("knn/fused");
        return scan_fused(problem, queries, packer, candidates);
      }
      BIASFAST_MARK_AVX2_BODY("knn/packed");
      return scan_packed(problem, queries, packer, candidates);
    }
  }
  return scan_gemm(problem, queries, packer, candidates);
}

}  // namespace biasfast
