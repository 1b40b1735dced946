// Fused SNR-weighted MSE on the CPU: one pass reads pred and target once, accumulates the per-sample
// sum of squares in float32 and (when asked) writes the finished gradient 2·w[t_b]·scale·(p − t)/N, so
// autograd's backward only rescales it (Liger-Kernel's pattern).
//
// Determinism: every sample is cut into fixed chunks of kChunk elements (independent of the thread count),
// each chunk is summed in a fixed lane order and the chunk partials are combined sequentially in float64,
// so the same inputs give the same bits on every run and with any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/isa.h"

#ifdef BIASFAST_HAVE_AVX2_BUILD
#include <immintrin.h>
#endif

namespace biasfast {
namespace {

constexpr int64_t kChunk = 1 << 14;       // elements per task
constexpr int64_t kUnit = 8;              // vector width in elements; chunks are peeled to a multiple of it
constexpr int64_t kStreamBytes = 8 << 20;  // gradients this large bypass the caches (non-temporal stores)

// ---------------------------------------------------------------------------------------------------
// Portable chunk kernel: the reference arithmetic, 8 float lanes like the AVX2 path.
template <typename scalar_t>
float chunk_portable(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t n, float coef) {
  float lanes[kUnit] = {};
  int64_t i = 0;
  for (; i + kUnit <= n; i += kUnit) {
    for (int64_t l = 0; l < kUnit; ++l) {
      const float d = static_cast<float>(p[i + l]) - static_cast<float>(q[i + l]);
      lanes[l] += d * d;
      if (g) g[i + l] = static_cast<scalar_t>(coef * d);
    }
  }
  float sum = 0;
  for (float lane : lanes) sum += lane;
  for (; i < n; ++i) {
    const float d = static_cast<float>(p[i]) - static_cast<float>(q[i]);
    sum += d * d;
    if (g) g[i] = static_cast<scalar_t>(coef * d);
  }
  return sum;
}

// float64 inputs keep float64 throughout (the tests' oracle dtype); four independent accumulators.
double chunk_double(const double* p, const double* q, double* g, int64_t n, double coef) {
  double acc[4] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int64_t l = 0; l < 4; ++l) {
      const double d = p[i + l] - q[i + l];
      acc[l] += d * d;
      if (g) g[i + l] = coef * d;
    }
  }
  double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < n; ++i) {
    const double d = p[i] - q[i];
    sum += d * d;
    if (g) g[i] = coef * d;
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA (+ F16C) chunk kernel, selected at run time; the build itself stays portable.
#ifdef BIASFAST_HAVE_AVX2_BUILD

BIASFAST_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
BIASFAST_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
BIASFAST_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Round to nearest even like c10::BFloat16(float); NaN becomes the canonical quiet NaN 0x7FC0.
BIASFAST_AVX2 inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: [0..3 0..3 | 4..7 4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

template <bool kStream>
BIASFAST_AVX2 inline void store8(float* x, __m256 v) {
  if constexpr (kStream) _mm256_stream_ps(x, v); else _mm256_storeu_ps(x, v);
}
template <bool kStream>
BIASFAST_AVX2 inline void store8(c10::Half* x, __m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(x), h);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(x), h);
}
template <bool kStream>
BIASFAST_AVX2 inline void store8(c10::BFloat16* x, __m256 v) {
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(x), to_bf16(v));
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(x), to_bf16(v));
}

// Sum of squares of p − q over n elements (n a multiple of kUnit), optionally writing coef·(p − q) to g.
// Four accumulators of 8 lanes, combined in a fixed order.
template <typename scalar_t, bool kGrad, bool kStream>
BIASFAST_AVX2 float body_avx2(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t n, float coef) {
  const __m256 c = _mm256_set1_ps(coef);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t i = 0;
  for (; i + 4 * kUnit <= n; i += 4 * kUnit) {
    const __m256 d0 = _mm256_sub_ps(load8(p + i), load8(q + i));
    const __m256 d1 = _mm256_sub_ps(load8(p + i + 8), load8(q + i + 8));
    const __m256 d2 = _mm256_sub_ps(load8(p + i + 16), load8(q + i + 16));
    const __m256 d3 = _mm256_sub_ps(load8(p + i + 24), load8(q + i + 24));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    acc1 = _mm256_fmadd_ps(d1, d1, acc1);
    acc2 = _mm256_fmadd_ps(d2, d2, acc2);
    acc3 = _mm256_fmadd_ps(d3, d3, acc3);
    if constexpr (kGrad) {
      store8<kStream>(g + i, _mm256_mul_ps(c, d0));
      store8<kStream>(g + i + 8, _mm256_mul_ps(c, d1));
      store8<kStream>(g + i + 16, _mm256_mul_ps(c, d2));
      store8<kStream>(g + i + 24, _mm256_mul_ps(c, d3));
    }
  }
  for (; i < n; i += kUnit) {
    const __m256 d = _mm256_sub_ps(load8(p + i), load8(q + i));
    acc0 = _mm256_fmadd_ps(d, d, acc0);
    if constexpr (kGrad) store8<kStream>(g + i, _mm256_mul_ps(c, d));
  }
  const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif  // BIASFAST_HAVE_AVX2_BUILD

// One chunk: a scalar head up to the next multiple of kUnit (global element index, so the gradient
// address is vector-aligned), the vector body, a scalar tail. The split depends only on the shape.
template <typename scalar_t>
float chunk_sum(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t start, int64_t n, float coef, bool stream) {
#ifdef BIASFAST_HAVE_AVX2_BUILD
  if (cpu_has_avx2()) {
    const int64_t head = std::min(n, (kUnit - start % kUnit) % kUnit);
    const int64_t body = (n - head) / kUnit * kUnit;
    float sum = chunk_portable(p, q, g, head, coef);
    const scalar_t *pb = p + head, *qb = q + head;
    scalar_t* gb = g ? g + head : nullptr;
    const bool aligned = gb && reinterpret_cast<uintptr_t>(gb) % (kUnit * sizeof(scalar_t)) == 0;
    if (!gb) sum += body_avx2<scalar_t, false, false>(pb, qb, gb, body, coef);
    else if (stream && aligned) sum += body_avx2<scalar_t, true, true>(pb, qb, gb, body, coef);
    else sum += body_avx2<scalar_t, true, false>(pb, qb, gb, body, coef);
    return sum + chunk_portable(pb + body, qb + body, gb ? gb + body : nullptr, n - head - body, coef);
  }
#endif
  return chunk_portable(p, q, g, n, coef);
}

void store_fence() {
#ifdef BIASFAST_HAVE_AVX2_BUILD
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the threads join
#endif
}

// ---------------------------------------------------------------------------------------------------
// A gradient buffer recycled between training steps: a fresh multi-megabyte allocation is mmap'ed and
// page-faulted on first touch, which costs more than the loss itself. The storage is reused only when
// nothing else references it any more (the previous step's backward has consumed and dropped it).
at::Tensor gradient_buffer(const at::Tensor& like) {
  static std::mutex mutex;
  static c10::Storage cached;
  const auto nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  std::lock_guard<std::mutex> lock(mutex);
  if (!cached || cached.use_count() != 1 || cached.nbytes() != nbytes || cached.device() != like.device()) {
    cached = at::empty({like.numel()}, like.options()).storage();
  }
  return at::empty({0}, like.options()).set_(cached, 0, like.sizes());
}

enum class Reduction { kMean, kSum, kNone };

Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  BIASFAST_CHECK_ARG(reduction == "none", "reduction", "expected 'mean', 'sum' or 'none', got '", reduction, "'");
  return Reduction::kNone;
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& timesteps,
                  const at::Tensor& weights) {
  BIASFAST_CHECK_ARG(pred.dim() >= 1 && pred.size(0) > 0, "pred", "expected a (batch, ...) tensor with batch ≥ 1, got shape ",
                     pred.sizes());
  BIASFAST_CHECK_ARG(pred.numel() > 0, "pred", "every sample needs at least one element, got shape ", pred.sizes());
  BIASFAST_CHECK_ARG(at::isFloatingType(pred.scalar_type()), "pred", "expected a floating dtype, got ", pred.scalar_type());
  BIASFAST_CHECK_ARG(target.sizes() == pred.sizes(), "target", "shape ", target.sizes(), " does not match pred's ",
                     pred.sizes());
  BIASFAST_CHECK_ARG(target.scalar_type() == pred.scalar_type(), "target", "dtype ", target.scalar_type(),
                     " does not match pred's ", pred.scalar_type());
  BIASFAST_CHECK_ARG(!at::isFloatingType(timesteps.scalar_type()) && !timesteps.is_complex() &&
                         timesteps.scalar_type() != at::kBool,
                     "timesteps", "expected an integer dtype, got ", timesteps.scalar_type());
  BIASFAST_CHECK_ARG(timesteps.dim() == 1 && timesteps.size(0) == pred.size(0), "timesteps",
                     "expected shape (", pred.size(0), ",) (one per sample), got ", timesteps.sizes());
  BIASFAST_CHECK_ARG(weights.dim() == 1 && weights.numel() > 0, "weights", "expected a non-empty 1-D table, got shape ",
                     weights.sizes());
  BIASFAST_CHECK_ARG(at::isFloatingType(weights.scalar_type()), "weights", "expected a floating dtype, got ",
                     weights.scalar_type());
  for (const auto& [t, name] : {std::pair{&target, "target"}, {&timesteps, "timesteps"}, {&weights, "weights"}}) {
    BIASFAST_CHECK_ARG(t->device() == pred.device(), name, "is on ", t->device(), " but pred is on ", pred.device());
  }
}

template <typename acc_t>
void check_values(const acc_t* w, int64_t num_weights, const int64_t* t, int64_t batch) {
  for (int64_t k = 0; k < num_weights; ++k) {
    BIASFAST_CHECK_ARG(std::isfinite(w[k]), "weights", "entry ", k, " is ", w[k], " (must be finite)");
    BIASFAST_CHECK_ARG(w[k] >= 0, "weights", "entry ", k, " is negative (", w[k], ")");
  }
  for (int64_t b = 0; b < batch; ++b) {
    BIASFAST_CHECK_ARG(t[b] >= 0 && t[b] < num_weights, "timesteps", "entry ", b, " is ", t[b], ", outside [0, ",
                       num_weights, ") (the weights table has ", num_weights, " entries)");
  }
}

template <typename scalar_t, typename acc_t>
void run_chunks(const scalar_t* p, const scalar_t* q, scalar_t* g, const acc_t* coef, int64_t batch, int64_t n,
                double* sums, bool stream) {
  const int64_t per_sample = (n + kChunk - 1) / kChunk;
  std::vector<acc_t> partial(batch * per_sample);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::min(n, kChunk));  // tiny problems stay serial
  at::parallel_for(0, batch * per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_sample, c = task % per_sample;
      const int64_t start = b * n + c * kChunk, len = std::min(kChunk, n - c * kChunk);
      if constexpr (std::is_same_v<scalar_t, double>) {
        partial[task] = chunk_double(p + start, q + start, g ? g + start : nullptr, len, coef[b]);
      } else {
        partial[task] = chunk_sum(p + start, q + start, g ? g + start : nullptr, start, len, coef[b], stream);
      }
    }
    if (g && stream) store_fence();
  });
  for (int64_t b = 0; b < batch; ++b) {
    double s = 0;
    for (int64_t c = 0; c < per_sample; ++c) s += partial[b * per_sample + c];
    sums[b] = s;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> snr_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                            const at::Tensor& timesteps, const at::Tensor& weights,
                                                            c10::string_view reduction, bool compute_grad) {
  check_inputs(pred, target, timesteps, weights);
  const Reduction mode = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const auto acc_type = accumulate_dtype(pred.scalar_type());
  const int64_t batch = pred.size(0), n = pred.numel() / batch, num_weights = weights.numel();
  const at::Tensor p = pred.contiguous(), q = target.contiguous();
  const at::Tensor t = timesteps.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_type).contiguous();
  at::Tensor grad = compute_grad ? gradient_buffer(pred) : at::empty({0}, pred.options());
  at::Tensor mse = at::empty({batch}, pred.options().dtype(acc_type));
  at::Tensor loss = mode == Reduction::kNone ? at::empty({batch}, mse.options()) : at::empty({}, mse.options());
  const double scale = mode == Reduction::kMean ? 1.0 / batch : 1.0;
  const bool stream = grad.numel() * grad.element_size() >= kStreamBytes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "snr_loss_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* wt = w.data_ptr<acc_t>();
    const int64_t* ts = t.data_ptr<int64_t>();
    check_values(wt, num_weights, ts, batch);
    std::vector<acc_t> coef(batch);
    for (int64_t b = 0; b < batch; ++b) coef[b] = static_cast<acc_t>(2.0 * wt[ts[b]] * scale / n);
    std::vector<double> sums(batch);
    run_chunks(p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), compute_grad ? grad.data_ptr<scalar_t>() : nullptr,
               coef.data(), batch, n, sums.data(), stream);
    acc_t* mse_out = mse.data_ptr<acc_t>();
    acc_t* loss_out = loss.data_ptr<acc_t>();
    double total = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const double m = sums[b] / n;
      mse_out[b] = static_cast<acc_t>(m);
      if (mode == Reduction::kNone) loss_out[b] = static_cast<acc_t>(wt[ts[b]] * m);
      total += wt[ts[b]] * m;
    }
    if (mode != Reduction::kNone) loss_out[0] = static_cast<acc_t>(total * scale);
  });
  return {loss, mse, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("snr_loss", &snr_loss_cpu);
}

}  // namespace biasfast
