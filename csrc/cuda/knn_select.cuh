// Running top-k selection of the CUDA kNN kernels (knn.cu, knn_hamming.cu): one warp per query keeps a list of
// (distance, index) sorted ascending with ties to the lower index, in shared memory for k <= kSharedK (the fast
// path) and in the query's output row in global memory beyond.
#pragma once
#include <cstdint>

namespace biasfast::knn_select {

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

}  // namespace biasfast::knn_select
