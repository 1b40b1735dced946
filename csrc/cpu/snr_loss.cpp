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
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/isa.h"
#include "common/fused_loss.h"

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
#ifdef BIASFAST_X86
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
  return sum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}
#endif  // BIASFAST_X86

// One chunk: a scalar head up to the next multiple of kUnit (global element index, so the gradient
// address is vector-aligned), the vector body, a scalar tail. The split depends only on the shape.
template <typename scalar_t>
float chunk_sum(const scalar_t* p, const scalar_t* q, scalar_t* g, int64_t start, int64_t n, float coef, bool stream) {
#ifdef BIASFAST_X86
  if (use_avx2()) {
    BIASFAST_MARK_AVX2_BODY("snr_loss");
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

RecycledBuffer gradient_buffer;

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
  select_cpu_isa("snr_loss");
  check_inputs(pred, target, timesteps, weights);
  const Reduction mode = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const auto acc_type = accumulate_dtype(pred.scalar_type());
  const int64_t batch = pred.size(0), n = pred.numel() / batch, num_weights = weights.numel();
  const at::Tensor p = pred.contiguous(), q = target.contiguous();
  const at::Tensor t = timesteps.to(at::kLong).contiguous();
  const at::Tensor w = weights.to(acc_type).contiguous();
  at::Tensor grad = compute_grad ? gradient_buffer.like(pred) : at::empty({0}, pred.options());
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
