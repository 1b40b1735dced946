// Lane-parallel belief propagation on the hierarchical model's binary tree: one SIMD lane per sequence.
// Lanes<T>::run_range is the whole kernel, every function of it forced inline, so each entry point that calls it
// (tree_bp.cpp: a portable one and one carrying BIASFAST_AVX2) gets its own copy compiled for its instruction set.
// Needs tree_bp_plan.h included first.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace biasfast::tree_bp_detail {

#define BP_INLINE inline __attribute__((always_inline))

template <typename T>
struct Lanes {
  static constexpr int W = 32 / sizeof(T);  // sequences per group: one 32-byte vector of T
  using IntT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(sizeof(T) * W)));
  typedef IntT VI __attribute__((vector_size(sizeof(T) * W)));

  // Below this a message normaliser is too small for linear-space float arithmetic to stay relatively exact:
  // such lanes are recomputed in log space.
  static constexpr T kTiny = sizeof(T) == 4 ? T(1e-30) : T(1e-290);

  BP_INLINE static V splat(T x) { return V{} + x; }

  // exp for x <= 0 (leaf potentials after subtracting their maximum); 0 below the normal range and for -inf.
  BP_INLINE static V exp_nonpositive(V x) {
    if constexpr (sizeof(T) == 4) {
      const V lo = splat(-87.0f);
      V clamped = x < lo ? lo : x;
      V n = clamped * 1.44269504088896341f + 0.5f;
      V floor_n = __builtin_convertvector(__builtin_convertvector(n, VI), V);
      floor_n = floor_n > n ? floor_n - 1.0f : floor_n;
      V r = clamped - floor_n * 0.693359375f + floor_n * 2.12194440e-4f;
      V p = splat(1.9875691500e-4f);
      p = p * r + 1.3981999507e-3f;
      p = p * r + 8.3334519073e-3f;
      p = p * r + 4.1665795894e-2f;
      p = p * r + 1.6666665459e-1f;
      p = p * r + 5.0000001201e-1f;
      p = p * (r * r) + r + 1.0f;
      VI bits = (__builtin_convertvector(floor_n, VI) + 127) << 23;
      V result = p * (V)bits;
      return x < lo ? splat(0.0f) : result;
    } else {
      V out;
      for (int l = 0; l < W; ++l) out[l] = std::exp(x[l]);
      return out;
    }
  }

  // log Z is carried as mantissa * 2^exponent per lane, so a product of many normalisers neither under- nor
  // overflows and costs no logarithm until the end.
  struct LogScale {
    V mantissa = splat(1);
    V exponent = splat(0);
    BP_INLINE void multiply(V factor) {
      mantissa *= factor;
      VI bits = (VI)mantissa;
      constexpr int shift = sizeof(T) == 4 ? 23 : 52;
      constexpr IntT field = sizeof(T) == 4 ? 0xff : 0x7ff, half_bias = sizeof(T) == 4 ? 126 : 1022;
      exponent += __builtin_convertvector(((bits >> shift) & field) - half_bias, V);
      bits = (bits & ~(field << shift)) | (half_bias << shift);
      mantissa = (V)bits;
    }
  };

  // Normalise q messages to sum 1; flags lanes whose sum is tiny, zero or NaN.
  BP_INLINE static V normalise(V* m, int q, VI& bad) {
    V sum = m[0];
    for (int a = 1; a < q; ++a) sum += m[a];
    bad |= ~(sum >= kTiny);
    V inv = splat(1) / sum;
    for (int a = 0; a < q; ++a) m[a] *= inv;
    return sum;
  }

  // One group of W sequences: evidence rows already multiplied by their scale, laid out [leaf*q + a][lane].
  // up/down hold 2L nodes × q messages (heap order: node 1 is the root, leaves are L..2L-1); work holds 3·J·q.
  BP_INLINE static void group(const Plan<T>& plan, V* up, V* down, V* work, V* log_z, VI& bad) {
    const int q = plan.q, L = plan.leaves, J = plan.top_nodes;
    LogScale scale;
    V lead_sum = splat(0);
    for (int i = 0; i < L; ++i) {  // leaves: psi = exp(h - max h)
      V* u = up + (L + i) * q;
      V lead = u[0];
      for (int a = 1; a < q; ++a) lead = u[a] > lead ? u[a] : lead;
      bad |= ~(lead == lead) | (lead == splat(-INFINITY));
      lead_sum += lead;
      for (int a = 0; a < q; ++a) u[a] = exp_nonpositive(u[a] - lead);
    }
    for (int v = L - 1; v >= J; --v) {  // upward: u_v(a) ∝ Σ M[a,b,c] u_l(b) u_r(c)
      const V *ul = up + 2 * v * q, *ur = ul + q;
      V* u = up + v * q;
      for (int a = 0; a < q; ++a) {
        V acc = splat(0);
        for (int r = plan.rule_start[a]; r < plan.rule_start[a + 1]; ++r) {
          const Rule<T>& rule = plan.rules[r];
          acc += rule.weight * (ul[rule.left] * ur[rule.right]);
        }
        u[a] = acc;
      }
      scale.multiply(normalise(u, q, bad));
    }
    // Top: messages m_j = P_j u_j to the root, root ∝ Π_j m_j, cavities by prefix/suffix products.
    V *to_root = work, *prefix = work + J * q, *suffix = work + 2 * J * q;
    for (int j = 0; j < J; ++j) {
      const T* P = plan.top + j * q * q;
      const V* u = up + (J + j) * q;
      V* m = to_root + j * q;
      for (int a = 0; a < q; ++a) {
        V acc = splat(0);
        for (int b = 0; b < q; ++b) acc += P[a * q + b] * u[b];
        m[a] = acc;
      }
      scale.multiply(normalise(m, q, bad));
    }
    for (int a = 0; a < q; ++a) {
      V running = splat(1);
      for (int j = 0; j < J; ++j) prefix[j * q + a] = running, running *= to_root[j * q + a];
      running = splat(1);
      for (int j = J - 1; j >= 0; --j) suffix[j * q + a] = running, running *= to_root[j * q + a];
    }
    V root = splat(0);
    for (int a = 0; a < q; ++a) root += prefix[(J - 1) * q + a] * to_root[(J - 1) * q + a];
    bad |= ~(root >= kTiny);
    scale.multiply(root);
    for (int j = 0; j < J; ++j) {
      const T* P = plan.top + j * q * q;
      V* d = down + (J + j) * q;
      for (int b = 0; b < q; ++b) d[b] = splat(0);
      for (int a = 0; a < q; ++a) {
        V cavity = prefix[j * q + a] * suffix[j * q + a];
        for (int b = 0; b < q; ++b) d[b] += P[a * q + b] * cavity;
      }
      normalise(d, q, bad);
    }
    for (int v = J; v < L; ++v) {  // downward: d_l(b) ∝ Σ d_v(a) M[a,b,c] u_r(c), symmetric for d_r
      const V *d = down + v * q, *ul = up + 2 * v * q, *ur = ul + q;
      V *dl = down + 2 * v * q, *dr = dl + q;
      for (int b = 0; b < q; ++b) {
        V acc = splat(0);
        for (int r = plan.left_start[b]; r < plan.left_start[b + 1]; ++r) {
          const Rule<T>& rule = plan.by_left[r];
          acc += rule.weight * (d[rule.parent] * ur[rule.right]);
        }
        dl[b] = acc;
      }
      for (int c = 0; c < q; ++c) {
        V acc = splat(0);
        for (int r = plan.right_start[c]; r < plan.right_start[c + 1]; ++r) {
          const Rule<T>& rule = plan.by_right[r];
          acc += rule.weight * (d[rule.parent] * ul[rule.left]);
        }
        dr[c] = acc;
      }
      normalise(dl, q, bad);
      normalise(dr, q, bad);
    }
    for (int i = 0; i < L; ++i) {  // leaf beliefs, written over `up`
      V *u = up + (L + i) * q, *d = down + (L + i) * q;
      for (int a = 0; a < q; ++a) u[a] *= d[a];
      normalise(u, q, bad);
    }
    V log_mantissa;
    for (int l = 0; l < W; ++l) log_mantissa[l] = std::log(scale.mantissa[l]);
    *log_z = lead_sum + log_mantissa + scale.exponent * T(0.69314718055994530942) - std::log(T(q));
  }

  // In-place transpose of a W×W block held as W vectors (row l becomes column l).
  BP_INLINE static void transpose(V* r) {
    typedef IntT M __attribute__((vector_size(sizeof(T) * W)));
    if constexpr (W == 8) {
      const M lo{0, 8, 1, 9, 4, 12, 5, 13}, hi{2, 10, 3, 11, 6, 14, 7, 15};
      const M even{0, 1, 8, 9, 4, 5, 12, 13}, odd{2, 3, 10, 11, 6, 7, 14, 15};
      const M low_halves{0, 1, 2, 3, 8, 9, 10, 11}, high_halves{4, 5, 6, 7, 12, 13, 14, 15};
      V t[8], u[8];
      for (int i = 0; i < 8; i += 2)
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo), t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
      for (int i = 0; i < 8; i += 4)
        for (int j = 0; j < 2; ++j)
          u[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], even),
          u[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], odd);
      for (int i = 0; i < 4; ++i)
        r[i] = __builtin_shuffle(u[i], u[i + 4], low_halves), r[i + 4] = __builtin_shuffle(u[i], u[i + 4], high_halves);
    } else {
      const M lo{0, 4, 2, 6}, hi{1, 5, 3, 7}, low_halves{0, 1, 4, 5}, high_halves{2, 3, 6, 7};
      V t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
      V t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
      r[0] = __builtin_shuffle(t0, t2, low_halves), r[2] = __builtin_shuffle(t0, t2, high_halves);
      r[1] = __builtin_shuffle(t1, t3, low_halves), r[3] = __builtin_shuffle(t1, t3, high_halves);
    }
  }

  BP_INLINE static V load_unaligned(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }

  // Heap storage of n vectors at their natural 32-byte alignment (sizeof(V): alignof(V) is only 16 outside AVX2
  // code, where this type is declared, but the AVX2 entry stores whole vectors aligned).
  struct AlignedBuffer {
    V* ptr;
    BP_INLINE explicit AlignedBuffer(size_t n) : ptr(static_cast<V*>(std::aligned_alloc(sizeof(V), n * sizeof(V)))) {
      TORCH_CHECK(ptr != nullptr, "tree_bp: out of memory");
    }
    BP_INLINE ~AlignedBuffer() { std::free(ptr); }
    BP_INLINE V* data() { return ptr; }
  };

  // Sequences [begin, end) of `batch`: gather W at a time into lanes, run, scatter back; flagged lanes are redone
  // in log space by the exact scalar path.
  BP_INLINE static void run_range(const Plan<T>& plan, const T* evidence, const T* scale_in, T* out, T* log_z_out,
                        int64_t batch, int64_t begin, int64_t end) {
    const int q = plan.q, L = plan.leaves;
    AlignedBuffer up(2 * L * q), down(2 * L * q), work(3 * plan.top_nodes * q);
    const int64_t row = int64_t(L) * q;
    for (int64_t first = begin; first < end; first += W) {
      const int lanes = int(std::min<int64_t>(W, end - first));
      V* leaves = up.data() + L * q;
      T* lane_view = reinterpret_cast<T*>(leaves);  // GCC vectors alias their element type
      const bool blocked = lanes == W && row % W == 0;  // whole W×W blocks: transpose in registers
      if (blocked) {
        V block[W];
        for (int64_t e0 = 0; e0 < row; e0 += W) {
          for (int l = 0; l < W; ++l)
            block[l] = load_unaligned(evidence + (first + l) * row + e0) * scale_in[first + l];
          transpose(block);
          for (int c = 0; c < W; ++c) leaves[e0 + c] = block[c];
        }
      } else {
        for (int64_t e = 0; e < row; ++e) leaves[e] = splat(0);
        for (int l = 0; l < lanes; ++l) {
          const T* src = evidence + (first + l) * row;
          const T s = scale_in[first + l];
          for (int64_t e = 0; e < row; ++e) lane_view[e * W + l] = s * src[e];
        }
      }
      VI bad = VI{};
      V log_z;
      group(plan, up.data(), down.data(), work.data(), &log_z, bad);
      if (blocked) {
        V block[W];
        for (int64_t e0 = 0; e0 < row; e0 += W) {
          for (int c = 0; c < W; ++c) block[c] = leaves[e0 + c];
          transpose(block);
          for (int l = 0; l < W; ++l) std::memcpy(out + (first + l) * row + e0, &block[l], sizeof(V));
        }
      }
      for (int l = 0; l < lanes; ++l) {
        const int64_t n = first + l;
        if (bad[l]) {
          log_z_out[n] = T(log_space_row(plan, evidence + n * row, scale_in[n], out + n * row));
          continue;
        }
        if (!blocked)
          for (int64_t e = 0; e < row; ++e) out[n * row + e] = lane_view[e * W + l];
        log_z_out[n] = log_z[l];
      }
    }
    (void)batch;
  }

};

#undef BP_INLINE

}  // namespace biasfast::tree_bp_detail
