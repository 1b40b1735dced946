// Cache-blocked inner products + running top-k for large feature sizes (d > kFusedMaxDim), float32, AVX2/FMA.
//
// Why: at d ≥ 512 the fused kernel of fused.h reads each query's whole row and each 16-reference panel's whole
// d-long block per register tile, so it runs from L2/L3 and stalls; calling the BLAS per tile (at::mm, MKL) is slow
// on this AMD CPU and needs an nq_tile × nr_tile product in memory plus a second pass for the selection.
//
// Design (BLIS-style, but both operands are packed once per search / per tile, so there is no per-block packing):
// - queries are packed once in 6-row panels, references one workspace tile at a time (≤ kTileBytes, so the tile
//   stays in L3 while every query block passes over it) in 16-row panels with norms (padding rows: zeros, norm
//   +inf); both layouts are blocked by depth (pack_blocked), so each (panel, depth block) is one contiguous stream;
// - loops, outermost first: query block (kMc queries, one per parallel task) → reference block (kNc refs) →
//   depth block (≤ kKc features, equal sizes) → 16-reference panel → 6-query panel → 6 × 16 register micro-kernel;
//   the A block (kMc × kc, ≈ 144 KB) stays in L2, one B micro-panel (kc × 16, 16 KB) in L1 across the 6-query
//   panels, the B block (kc × kNc, 1 MB) in L3;
// - partial sums of a 6 × 16 tile live in a per-thread kMc × kNc buffer between depth blocks; the LAST depth
//   block adds them to its registers and feeds ‖y‖² − 2·x·y straight into the running top-k selection
//   (select_tile_6x16, thresholds in registers): no nq × nr (or tile × tile) matrix is ever written.
// Parallelism (lanes.h): normally one lane per thread, each owning a contiguous
// reference range, its own tiles and heaps, merged at the end (merge_heaps): one parallel region per search, no
// barrier per tile. With few references and many queries: one lane, each tile scanned in parallel over query
// blocks.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "common/isa.h"
#include "cpu/knn/heap.h"
#include "cpu/knn/fused.h"

namespace biasfast {

constexpr int64_t kKc = 256;  // features per depth block
constexpr int64_t kMc = 144;  // queries per query block (a multiple of kRows)
constexpr int64_t kNc = 1024;  // references per reference block (a multiple of kPanel)
constexpr int64_t kTileBytes = 8 << 20;  // packed references per workspace tile, at most (shared L3: 32 MB)

// Features per depth block for feature size d: blocks of at most kKc, all of (nearly) equal size.
inline int64_t depth_step(int64_t d) {
  const int64_t blocks = (d + kKc - 1) / kKc;
  return (d + blocks - 1) / blocks;
}

// One 6 × 16 tile over one depth block: a = [kc][6] query panel, b = [kc][16] reference panel, c = [6][16] partial
// sums. kFirst: no partial sums yet; kLast: finish the tile into the selection instead of storing it.
template <bool kFirst, bool kLast>
BIASFAST_AVX2 inline void packed_tile_6x16(const float* a, const float* b, int64_t kc, float* c, const float* norms,
                                           int64_t rows, int64_t base, const int64_t* self, HeapView<float>* heaps) {
  __m256 acc[kRows][2];
  tile_6x16([a](int64_t r, int64_t t) { return a + t * kRows + r; }, b, kc, acc);
  if constexpr (!kFirst) {
    for (int64_t r = 0; r < kRows; ++r) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(c + r * kPanel));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(c + r * kPanel + 8));
    }
  }
  if constexpr (kLast) {
    float thr[kRows];
    start_thresholds(heaps, rows, thr);
    select_tile_6x16(acc, norms, rows, base, self, heaps, thr);
  } else {
    for (int64_t r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(c + r * kPanel, acc[r][0]);
      _mm256_storeu_ps(c + r * kPanel + 8, acc[r][1]);
    }
  }
}

// Where one block of queries finds its inputs and heaps. Query i of the block is global query i0 + i; its heap is
// heaps + i · capacity (sizes[i]); it must skip the reference self[i] (no self: skip nothing).
struct QueryBlock {
  const float* panels;  // all queries' 6-row panels, pack_blocked<kRows> with depth_step(d)
  int64_t padded;       // query rows in all, a multiple of kRows
  int64_t i0, count;
  Entry<float>* heaps;
  int64_t* sizes;
  int64_t capacity;
  const int64_t* self;   // the block's own entries (query i0 + i at self[i]), or nullptr
  const float* limits;   // the block's heap limits (HeapView::limit of query i0 + i at limits[i])
};

// Feed references [r0, r1) of the packed tile (pack_blocked<kPanel> with depth_step(d), `padded` rows, and their
// norms; r0, r1 multiples of kPanel, global index of tile row 0 = base) to every query of the block.
// References are taken `block` (≤ kNc, a multiple of kPanel) at a time; cbuf holds kMc × block floats of partial
// sums.
BIASFAST_AVX2 inline void packed_scan_block(const QueryBlock& q, const float* panels, const float* norms,
                                            int64_t padded, int64_t r0, int64_t r1, int64_t d, int64_t base,
                                            int64_t block, float* cbuf) {
  const int64_t qpanels = (q.count + kRows - 1) / kRows;
  for (int64_t j0 = r0; j0 < r1; j0 += block) {
    const int64_t j1 = std::min(r1, j0 + block);
    const int64_t step = depth_step(d);
    for (int64_t pc = 0; pc < d; pc += step) {
      const int64_t kc = std::min(step, d - pc);
      const bool first = pc == 0, last = pc + kc == d;
      for (int64_t j = j0; j < j1; j += kPanel) {
        const float* b = panels + pc * padded + j * kc;
        float* c = cbuf + (j - j0) * kMc;
        // The next B micro-panel (kc lines of 64 bytes) is fetched into L2 a slice per 6-query panel, so moving
        // on to it does not wait on L3.
        const char* next_b = reinterpret_cast<const char*>(b + kPanel * kc);
        const int64_t lines_per_call = (kc + qpanels - 1) / qpanels;
        for (int64_t ip = 0; ip < qpanels; ++ip) {
          for (int64_t l = ip * lines_per_call; l < std::min(kc, (ip + 1) * lines_per_call); ++l)
            _mm_prefetch(next_b + 64 * l, _MM_HINT_T1);
          const float* a = q.panels + pc * q.padded + (q.i0 + ip * kRows) * kc;
          float* ct = c + ip * kRows * kPanel;
          const int64_t row0 = ip * kRows, rows = std::min(kRows, q.count - row0);
          HeapView<float> heaps[kRows];
          int64_t self[kRows];
          if (last) {
            for (int64_t r = 0; r < rows; ++r) {
              heaps[r] = {q.heaps + (row0 + r) * q.capacity, q.capacity, q.sizes + row0 + r, q.limits[row0 + r]};
              self[r] = q.self ? q.self[row0 + r] : -1;
            }
          }
          const int64_t at = base + j;
          if (first && last) packed_tile_6x16<true, true>(a, b, kc, ct, norms + j, rows, at, self, heaps);
          else if (first) packed_tile_6x16<true, false>(a, b, kc, ct, norms + j, rows, at, self, heaps);
          else if (last) packed_tile_6x16<false, true>(a, b, kc, ct, norms + j, rows, at, self, heaps);
          else packed_tile_6x16<false, false>(a, b, kc, ct, norms + j, rows, at, self, heaps);
        }
      }
    }
  }
}

}  // namespace biasfast
