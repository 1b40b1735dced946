// The tiled exact kNN kernel shared by knn.cu (squared differences) and knn_hamming.cu (differing tokens).
// Shared-memory tiles of (8 queries × 32 references × 32 columns) give each (query, reference) distance by direct
// per-column terms; each query's warp keeps a running top-k of (distance, index) sorted ascending with ties to the
// lower index: in shared memory for k <= kSharedK (the fast path), in the query's output row in global memory
// beyond. Launched on the current stream.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace biasfast::knn_gpu {

constexpr int kQueries = 8;  // queries per block, one warp each
constexpr int kRefs = 32;    // references per tile, one lane each
constexpr int kColumns = 32;  // columns (features, positions) per shared-memory chunk

// Stage rows [row0, row0 + kRows) × columns [col0, col0 + kCols) of the (n, d) row-major `src` into `tile` as T,
// zero outside the matrix (zeros add nothing to a squared difference and never differ as tokens).
template <int kRows, int kCols, int kPitch, typename T, typename S>
__device__ inline void stage_tile(T (*tile)[kPitch], const S* __restrict__ src, int64_t row0, int64_t n, int64_t col0,
                                  int64_t d) {
  for (int e = threadIdx.x; e < kRows * kCols; e += blockDim.x) {
    const int r = e / kCols, t = e % kCols;
    tile[r][t] = (row0 + r < n && col0 + t < d) ? static_cast<T>(src[(row0 + r) * d + col0 + t]) : T(0);
  }
}

constexpr int kSharedK = 256;  // largest k kept in shared memory

template <typename acc_t>
__device__ inline bool before(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  return va < vb || (va == vb && ia < ib);
}

// Insert (v, j) into the sorted list (dist, index) of length k held by one warp (v is known to beat dist[k-1]).
template <typename acc_t>
__device__ void warp_insert(acc_t* dist, int64_t* index, int k, acc_t v, int64_t j, int lane) {
  int pos = 0;
  for (int base = 0; base < k; base += 32) {
    const int e = base + lane;
    const bool smaller = e < k && before(dist[e], index[e], v, j);
    pos += __popc(__ballot_sync(0xffffffffu, smaller));
  }
  for (int base = ((k - 1) / 32) * 32; base >= 0; base -= 32) {  // shift [pos, k-1) right, from the end
    const int e = base + lane;
    const bool move = e >= pos && e + 1 < k;
    acc_t dv = move ? dist[e] : acc_t(0);
    int64_t iv = move ? index[e] : 0;
    __syncwarp();
    if (move) {
      dist[e + 1] = dv;
      index[e + 1] = iv;
    }
    __syncwarp();
  }
  if (lane == 0) {
    dist[pos] = v;
    index[pos] = j;
  }
  __syncwarp();
}

// Dynamic shared memory of a block of `warps` queries, each with a list of k entries (0 beyond the fast path).
template <typename acc_t>
inline size_t list_bytes(int warps, int64_t k) {
  return k <= kSharedK ? static_cast<size_t>(warps) * k * (sizeof(acc_t) + sizeof(int64_t)) : 0;
}

// One query's list: the warp's slice of `list_memory` (dynamic shared memory) or the output row `row`.
template <typename acc_t>
struct WarpList {
  acc_t* dist;
  int64_t* index;
  int k;
  bool shared;

  __device__ WarpList(unsigned char* list_memory, int warps, int warp, int k_, acc_t* out_dist, int64_t* out_index,
                      int64_t row)
      : k(k_), shared(k_ <= kSharedK) {
    dist = shared ? reinterpret_cast<acc_t*>(list_memory) + warp * k : out_dist + row * k;
    index = shared ? reinterpret_cast<int64_t*>(reinterpret_cast<acc_t*>(list_memory) + warps * k) + warp * k
                   : out_index + row * k;
  }

  // Every entry (inf, -1): the padding of rows with fewer than k eligible references.
  __device__ void reset(int lane) {
    for (int e = lane; e < k; e += 32) {
      dist[e] = static_cast<acc_t>(INFINITY);
      index[e] = -1;
    }
    __syncwarp();
  }

  // Each lane's candidate (v, j) where `eligible`, taken in increasing lane order (lanes hold increasing
  // reference indices); each re-checks against the threshold as earlier lanes update it.
  __device__ void offer(acc_t v, int64_t j, bool eligible, int lane) {
    const bool wins = eligible && before(v, j, dist[k - 1], index[k - 1]);
    unsigned ballot = __ballot_sync(0xffffffffu, wins);
    while (ballot) {
      const int src = __ffs(ballot) - 1;
      ballot &= ballot - 1;
      const acc_t vv = __shfl_sync(0xffffffffu, v, src);
      const int64_t jj = __shfl_sync(0xffffffffu, j, src);
      if (before(vv, jj, dist[k - 1], index[k - 1])) warp_insert(dist, index, k, vv, jj, lane);
    }
  }

  // Copy a shared-memory list to its output row (a global-memory list is there already).
  __device__ void store(acc_t* out_dist, int64_t* out_index, int64_t row, int lane) const {
    if (!shared) return;
    for (int e = lane; e < k; e += 32) {
      out_dist[row * k + e] = dist[e];
      out_index[row * k + e] = index[e];
    }
  }
};

// `Term::add(acc, a, b)` adds one column's contribution to a distance; tiles hold columns as tile_t (zero outside
// the matrices: zeros add nothing to either term), distances accumulate as acc_t and are listed as list_t.
template <typename Term, typename in_t, typename tile_t, typename acc_t, typename list_t>
__global__ void tiled_knn_kernel(const in_t* __restrict__ query, const in_t* __restrict__ ref, int64_t nq,
                                 int64_t nr, int64_t d, int k, int64_t offset, bool exclude_self,
                                 list_t* __restrict__ out_dist, int64_t* __restrict__ out_index) {
  __shared__ tile_t qs[kQueries][kColumns];
  __shared__ tile_t rs[kRefs][kColumns + 1];
  extern __shared__ unsigned char list_memory[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t first_query = static_cast<int64_t>(blockIdx.x) * kQueries, qi = first_query + warp;
  WarpList<list_t> list(list_memory, kQueries, warp, k, out_dist, out_index, qi);
  if (qi < nq) list.reset(lane);
  for (int64_t j0 = 0; j0 < nr; j0 += kRefs) {
    acc_t acc = 0;
    for (int64_t t0 = 0; t0 < d; t0 += kColumns) {
      stage_tile<kQueries, kColumns>(qs, query, first_query, nq, t0, d);
      stage_tile<kRefs, kColumns>(rs, ref, j0, nr, t0, d);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kColumns; ++t) acc = Term::add(acc, qs[warp][t], rs[lane][t]);
      __syncthreads();
    }
    if (qi >= nq) continue;
    const int64_t j = j0 + lane + offset;
    list.offer(static_cast<list_t>(acc), j, j0 + lane < nr && !(exclude_self && j == qi), lane);
  }
  if (qi < nq) list.store(out_dist, out_index, qi, lane);
}

// Fill dist (nq, k) list_t and index (nq, k) int64 with the k nearest rows of r for every row of q (contiguous).
template <typename Term, typename in_t, typename tile_t, typename acc_t, typename list_t>
void launch_tiled_knn(const at::Tensor& q, const at::Tensor& r, int64_t k, int64_t index_offset, bool exclude_self,
                      at::Tensor& dist, at::Tensor& index) {
  const int64_t nq = q.size(0);
  const dim3 grid((nq + kQueries - 1) / kQueries), block(kQueries * 32);
  tiled_knn_kernel<Term, in_t, tile_t, acc_t, list_t>
      <<<grid, block, list_bytes<list_t>(kQueries, k), c10::cuda::getCurrentCUDAStream()>>>(
          q.data_ptr<in_t>(), r.data_ptr<in_t>(), nq, r.size(0), q.size(1), static_cast<int>(k), index_offset,
          exclude_self, dist.data_ptr<list_t>(), index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace biasfast::knn_gpu
