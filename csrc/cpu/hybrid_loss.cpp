// The learned-variance hybrid loss of Improved DDPM / guided-diffusion (`training_losses` with learn_sigma=True,
// rescale_learned_sigmas=True), fused on the CPU: one pass reads the model output (B, 2C, ...) and the target,
// accumulates the per-sample MSE and L_vlb, and (when asked) writes the finished gradient d loss / d model_output,
// so autograd's backward only rescales it (Liger-Kernel's pattern, as csrc/cpu/snr_loss.cpp).
//
// Per element, with e = pred − target (target ε, or x0 for prediction "sample"):
//   mse  += e²                                  (gradient scale·w_t·2e/n on the prediction channels)
//   t > 0: the KL of the true posterior N(μ̃, β̃) from the model's N(μ, σ²) on the stop-gradient mean.
//     μ̃ − μ = coef1·(x0 − x̂0), and x0 − x̂0 = sqrt(1/ᾱ − 1)·(ε̂ − ε) for ε-prediction: x_t cancels exactly,
//     so neither x_t nor the other input is read, and float32 avoids the cancellation of forming both means.
//     With x = log σ² − log β̃_clipped = (v+1)/2·Δ (Δ = log β_t − log β̃_t):
//     2·kl = (x − 1 + e^{−x}) + (μ̃ − μ)²·e^{−log β̃}·e^{−x}   (x − 1 + e^{−x} by its series for |x| < ½).
//   t = 0: the discretised-Gaussian decoder NLL of x0 (the tanh CDF with the ±0.999 edge branches and the 1e-12
//     clamp): for float inputs in float32 AVX2 lanes, with x0 − μ formed like μ̃ − μ above and the bin mass and tails
//     as products of e^{−2u} terms (no cancellation); for double inputs and the generic variant in double,
//     transcribed step by step from guided-diffusion (x_t, x̂0, μ).
// vb = (sum / n) / ln 2 · T/1000; the vb gradient goes to the variance channels v only.
//
// Determinism: each sample is cut into fixed chunks of kChunk elements; chunk partials are combined
// sequentially in double, so results are the same bits on every run and with any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/isa.h"
#include "common/fused_loss.h"
#include "common/sampler_step_coefficients.h"

namespace biasfast {
namespace {

constexpr int64_t kChunk = 1 << 14;        // elements per task
constexpr int64_t kUnit = 8;               // vector width in elements
constexpr int64_t kStreamBytes = 8 << 20;  // gradients this large bypass the caches (non-temporal stores)
constexpr double kLn2 = 0.69314718055994530942;

// Columns of the (T, kColumns) float64 table built by biasfast/ops/hybrid_loss.py::hybrid_loss_table.
enum Column : int64_t {
  kSqrtAlphaBar, kSqrtOneMinusAlphaBar, kSqrtRecipAlphaBar, kSqrtRecipm1AlphaBar,
  kCoef1, kCoef2, kMinLog, kMaxLog, kColumns
};

// Per-sample constants of the KL branch, in the accumulation type.
template <typename acc_t>
struct KlCoefs {
  acc_t mse_grad;     // scale · w_t · 2 / n
  acc_t diff;         // μ̃ − μ = diff · e
  acc_t half_delta;   // Δ / 2: x = (v + 1) · Δ/2
  acc_t exp_neg_min;  // e^{−log β̃_clipped}
  acc_t v_grad;       // scale · (T/1000)/(n ln 2) · Δ/4
};

// (x − 1 + e^{−x}, 1 − e^{−x}) given ex = e^{−x}; float uses the Taylor series where the direct form cancels.
template <typename acc_t>
inline void kl_shape(acc_t x, acc_t ex, acc_t& f, acc_t& g) {
  if constexpr (std::is_same_v<acc_t, double>) {
    f = x + std::expm1(-x);
    g = -std::expm1(-x);
  } else {
    if (std::fabs(x) < 0.5f) {
      f = x * x * (0.5f + x * (-1.f / 6 + x * (1.f / 24 + x * (-1.f / 120 + x * (1.f / 720 + x * (-1.f / 5040 +
          x * (1.f / 40320 + x * (-1.f / 362880))))))));
      g = x * (1.f + x * (-0.5f + x * (1.f / 6 + x * (-1.f / 24 + x * (1.f / 120 + x * (-1.f / 720 +
          x * (1.f / 5040 + x * (-1.f / 40320))))))));
    } else {
      f = (x - 1) + ex;
      g = 1 - ex;
    }
  }
}

// The KL branch over n elements, scalar: the reference arithmetic and the head/tail of the AVX2 body.
// Sums go to double (the AVX2 body adds float blocks of kBlock elements to double the same way).
template <typename scalar_t, typename acc_t>
void kl_portable(const scalar_t* p, const scalar_t* v, const scalar_t* q, scalar_t* gp, scalar_t* gv, int64_t n,
                 const KlCoefs<acc_t>& c, double& mse, double& kl) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t e = static_cast<acc_t>(p[i]) - static_cast<acc_t>(q[i]);
    const acc_t x = (static_cast<acc_t>(v[i]) + 1) * c.half_delta;
    const acc_t ex = std::exp(-x);
    acc_t f, g;
    kl_shape(x, ex, f, g);
    const acc_t d = c.diff * e;
    const acc_t d2 = d * d * c.exp_neg_min * ex;
    mse += e * e;
    kl += f + d2;
    if (gp) {
      gp[i] = static_cast<scalar_t>(c.mse_grad * e);
      gv[i] = static_cast<scalar_t>(c.v_grad * (g - d2));
    }
  }
}

#ifdef BIASFAST_X86
// Horner evaluation of Σ c_k x^k, coefficients from the highest power down.
template <size_t N>
BIASFAST_AVX2 inline __m256 horner8(__m256 x, const float (&c)[N]) {
  __m256 y = _mm256_set1_ps(c[0]);
  for (size_t k = 1; k < N; ++k) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c[k]));
  return y;
}

constexpr float kSeriesF[] = {-1.f / 362880, 1.f / 40320, -1.f / 5040, 1.f / 720, -1.f / 120, 1.f / 24, -1.f / 6, 0.5f};
constexpr float kSeriesG[] = {-1.f / 40320, 1.f / 5040, -1.f / 720, 1.f / 120, -1.f / 24, 1.f / 6, -0.5f, 1.f};

// Adds the 8 float lanes of `block` to the 4 + 4 double lanes of (lo, hi).
BIASFAST_AVX2 inline void add_to_double(__m256 block, __m256d& lo, __m256d& hi) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(block)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(block, 1)));
}

BIASFAST_AVX2 inline double sum_double(__m256d lo, __m256d hi) {
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(lo, hi));
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// The KL branch over n elements (a multiple of kUnit), 8 lanes at a time; same formulas as kl_portable.
// Float lanes sum blocks of kBlock elements, which are then added in double (float32 error stays ~1e-7).
template <typename scalar_t, bool kGrad, bool kStream>
BIASFAST_AVX2 void kl_avx2(const scalar_t* p, const scalar_t* v, const scalar_t* q, scalar_t* gp, scalar_t* gv,
                           int64_t n, const KlCoefs<float>& c, double& mse, double& kl) {
  constexpr int64_t kBlock = 32 * kUnit;
  const __m256 half_delta = _mm256_set1_ps(c.half_delta), diff = _mm256_set1_ps(c.diff);
  const __m256 exp_neg_min = _mm256_set1_ps(c.exp_neg_min), one = _mm256_set1_ps(1.f);
  const __m256 mse_grad = _mm256_set1_ps(c.mse_grad), v_grad = _mm256_set1_ps(c.v_grad);
  const __m256 half = _mm256_set1_ps(0.5f), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256d mse_lo = _mm256_setzero_pd(), mse_hi = mse_lo, kl_lo = mse_lo, kl_hi = mse_lo;
  for (int64_t block = 0; block < n; block += kBlock) {
    __m256 mse_acc = _mm256_setzero_ps(), kl_acc = _mm256_setzero_ps();
    const int64_t block_end = std::min(n, block + kBlock);
    for (int64_t i = block; i < block_end; i += kUnit) {
      const __m256 e = _mm256_sub_ps(load8(p + i), load8(q + i));
      const __m256 x = _mm256_fmadd_ps(load8(v + i), half_delta, half_delta);
      const __m256 ex = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
      const __m256 small = _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), half, _CMP_LT_OQ);
      const __m256 f = _mm256_blendv_ps(_mm256_add_ps(_mm256_sub_ps(x, one), ex),
                                        _mm256_mul_ps(_mm256_mul_ps(x, x), horner8(x, kSeriesF)), small);
      const __m256 g = _mm256_blendv_ps(_mm256_sub_ps(one, ex), _mm256_mul_ps(x, horner8(x, kSeriesG)), small);
      const __m256 d = _mm256_mul_ps(diff, e);
      const __m256 d2 = _mm256_mul_ps(_mm256_mul_ps(d, d), _mm256_mul_ps(exp_neg_min, ex));
      mse_acc = _mm256_fmadd_ps(e, e, mse_acc);
      kl_acc = _mm256_add_ps(kl_acc, _mm256_add_ps(f, d2));
      if constexpr (kGrad) {
        store8<kStream>(gp + i, _mm256_mul_ps(mse_grad, e));
        store8<kStream>(gv + i, _mm256_mul_ps(v_grad, _mm256_sub_ps(g, d2)));
      }
    }
    add_to_double(mse_acc, mse_lo, mse_hi);
    add_to_double(kl_acc, kl_lo, kl_hi);
  }
  mse += sum_double(mse_lo, mse_hi);
  kl += sum_double(kl_lo, kl_hi);
}
#endif  // BIASFAST_X86

// One KL chunk starting at element `start` of the sample: a scalar head up to the gradient's next vector
// boundary, the vector body, a scalar tail (the split depends only on the shape, so results do too).
template <typename scalar_t, typename acc_t>
void kl_chunk(const scalar_t* p, const scalar_t* v, const scalar_t* q, scalar_t* gp, scalar_t* gv, int64_t offset,
              int64_t n, const KlCoefs<acc_t>& c, bool stream, double& mse, double& kl) {
#ifdef BIASFAST_X86
  if constexpr (!std::is_same_v<acc_t, double>) {
    if (use_avx2()) {
      BIASFAST_MARK_AVX2_BODY("hybrid_loss/kl");
      const int64_t head = std::min(n, (kUnit - offset % kUnit) % kUnit);
      const int64_t body = (n - head) / kUnit * kUnit;
      kl_portable(p, v, q, gp, gv, head, c, mse, kl);
      const auto at = [&](auto* ptr, int64_t k) { return ptr ? ptr + k : nullptr; };
      const bool aligned = gp && reinterpret_cast<uintptr_t>(gp + head) % (kUnit * sizeof(scalar_t)) == 0 &&
                           reinterpret_cast<uintptr_t>(gv + head) % (kUnit * sizeof(scalar_t)) == 0;
      if (!gp) kl_avx2<scalar_t, false, false>(p + head, v + head, q + head, gp, gv, body, c, mse, kl);
      else if (stream && aligned) kl_avx2<scalar_t, true, true>(p + head, v + head, q + head, gp + head, gv + head, body, c, mse, kl);
      else kl_avx2<scalar_t, true, false>(p + head, v + head, q + head, gp + head, gv + head, body, c, mse, kl);
      const int64_t done = head + body;
      kl_portable(p + done, v + done, q + done, at(gp, done), at(gv, done), n - done, c, mse, kl);
      return;
    }
  }
#endif
  kl_portable(p, v, q, gp, gv, n, c, mse, kl);
}

// guided-diffusion's approx_standard_normal_cdf 0.5·(1 + tanh(u)), u = √(2/π)·(y + 0.044715·y³), and its
// derivative, through one exp: 0.5·(1 + tanh u) = 1/(1 + e^{−2u}) and 1 − tanh² u = 4·cdf²·e^{−2u} (half the
// cost of two tanh; the exponent is capped so that the far left tail gives cdf = density = 0, never NaN).
inline void approx_cdf(double y, double& cdf, double& density) {
  constexpr double k = 0.79788456080286535588, a = 0.044715;
  const double z = std::exp(std::min(-2.0 * k * (y + a * y * y * y), 700.0));
  cdf = 1.0 / (1.0 + z);
  density = 2.0 * cdf * cdf * z * k * (1.0 + 3.0 * a * y * y);
}

// Per-sample constants of the decoder branch (t = 0), in double.
struct DecoderCoefs {
  double mse_grad, v_grad, sqrt_alpha_bar, sqrt_one_minus, sqrt_recip, sqrt_recipm1, coef1, coef2, min_log, max_log;
};

// −log p(x0) of discretized_gaussian_log_likelihood for one pixel and d(−log p)/d log_scale.
inline void decoder_nll(double x0, double mean, double log_scale, double& nll, double& dnll) {
  constexpr double kBin = 1.0 / 255.0, kFloor = 1e-12;
  const double centered = x0 - mean, inv_stdv = std::exp(-log_scale);
  const double plus_in = inv_stdv * (centered + kBin), min_in = inv_stdv * (centered - kBin);
  double cdf_plus, pdf_plus, cdf_min, pdf_min;
  approx_cdf(plus_in, cdf_plus, pdf_plus);
  approx_cdf(min_in, cdf_min, pdf_min);
  // d plus_in / d log_scale = −plus_in (and likewise min_in); a clamped log has zero gradient.
  double log_prob, dlog;
  if (x0 < -0.999) {
    log_prob = std::log(std::max(cdf_plus, kFloor));
    dlog = cdf_plus > kFloor ? -pdf_plus * plus_in / cdf_plus : 0.0;
  } else if (x0 > 0.999) {
    const double tail = 1.0 - cdf_min;
    log_prob = std::log(std::max(tail, kFloor));
    dlog = tail > kFloor ? pdf_min * min_in / tail : 0.0;
  } else {
    const double delta = cdf_plus - cdf_min;
    log_prob = std::log(std::max(delta, kFloor));
    dlog = delta > kFloor ? (-pdf_plus * plus_in + pdf_min * min_in) / delta : 0.0;
  }
  nll = -log_prob;
  dnll = -dlog;
}

// The decoder branch over n elements, in double: the float64 path, the generic CPU variant, and the head/tail of
// the AVX2 body.
template <typename scalar_t>
void decoder_portable(const scalar_t* p, const scalar_t* v, const scalar_t* x0, const scalar_t* eps, scalar_t* gp,
                   scalar_t* gv, int64_t n, const DecoderCoefs& c, bool predicts_eps, double& mse, double& nll) {
  for (int64_t i = 0; i < n; ++i) {
    const double out = static_cast<double>(p[i]), x = static_cast<double>(x0[i]), e = static_cast<double>(eps[i]);
    const double err = out - (predicts_eps ? e : x);
    const double x_t = c.sqrt_alpha_bar * x + c.sqrt_one_minus * e;
    const double x_hat = predicts_eps ? c.sqrt_recip * x_t - c.sqrt_recipm1 * out : out;
    const double mean = c.coef1 * x_hat + c.coef2 * x_t;
    const double frac = (static_cast<double>(v[i]) + 1.0) / 2.0;
    const double log_variance = frac * c.max_log + (1.0 - frac) * c.min_log;
    double value, dvalue;
    decoder_nll(x, mean, 0.5 * log_variance, value, dvalue);
    mse += err * err;
    nll += value;
    if (gp) {
      gp[i] = static_cast<scalar_t>(c.mse_grad * err);
      gv[i] = static_cast<scalar_t>(c.v_grad * dvalue);
    }
  }
}

#ifdef BIASFAST_X86
// Per-sample constants of the AVX2 decoder, in float. With x̂0 = x0 − r the centred x0 − μ is
// (1 − coef1)·x0 − coef2·x_t + coef1·r, and r = x0 − x̂0 is sqrt(1/ᾱ − 1)·(ε̂ − ε) for ε-prediction (x_t cancels
// exactly, as in the KL branch) or x0 − x̂0 for x0-prediction; at t = 0 coef1 = 1 and coef2 = 0. So float32
// forms x0 − μ without the cancellation of subtracting two means, which the double path needs double for.
struct DecoderCoefs8 {
  float mse_grad, v_grad, sqrt_alpha_bar, sqrt_one_minus, one_minus_coef1, coef2, error_to_centred;
  float half_min_log, quarter_delta;
};

DecoderCoefs8 decoder_coefs8(const DecoderCoefs& c, bool predicts_eps) {
  return {static_cast<float>(c.mse_grad), static_cast<float>(c.v_grad), static_cast<float>(c.sqrt_alpha_bar),
          static_cast<float>(c.sqrt_one_minus), static_cast<float>(1.0 - c.coef1), static_cast<float>(c.coef2),
          static_cast<float>(predicts_eps ? c.coef1 * c.sqrt_recipm1 : -c.coef1),
          static_cast<float>(0.5 * c.min_log), static_cast<float>((c.max_log - c.min_log) / 4.0)};
}

// approx_cdf of 8 lanes, also returning z = e^{−2u}: 1 − cdf = z·cdf and cdf(b) − cdf(a) = (z_a − z_b)·cdf(a)·cdf(b)
// keep the tails and the bin mass free of cancellation in float. |y| is capped at 1e4 (the CDF is 0 or 1 to float
// precision long before) so that y³ and the density stay finite; the exponent at 80 keeps cdf a normal float.
BIASFAST_AVX2 inline void approx_cdf8(__m256 y, __m256& z, __m256& cdf, __m256& density) {
  constexpr float k = 0.79788456080286535588f, a = 0.044715f;
  y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-1e4f)), _mm256_set1_ps(1e4f));
  const __m256 y2 = _mm256_mul_ps(y, y);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(-2.0f * k), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(a), y2), y, y));
  z = exp8(_mm256_min_ps(u, _mm256_set1_ps(80.0f)));
  cdf = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), z));
  const __m256 shape = _mm256_fmadd_ps(_mm256_set1_ps(3.0f * a), y2, _mm256_set1_ps(1.0f));
  density = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(cdf, cdf), _mm256_mul_ps(z, _mm256_set1_ps(2.0f * k))), shape);
}

// The decoder branch over n elements (a multiple of kUnit), 8 float lanes; the same branches as decoder_nll
// (edge bins at ±0.999, the 1e-12 clamp with zero gradient), sums added to double every kBlock elements.
template <typename scalar_t, bool kGrad>
BIASFAST_AVX2 void decoder_avx2(const scalar_t* p, const scalar_t* v, const scalar_t* x0, const scalar_t* eps,
                                scalar_t* gp, scalar_t* gv, int64_t n, const DecoderCoefs8& c, bool predicts_eps,
                                double& mse, double& nll) {
  constexpr int64_t kBlock = 32 * kUnit;
  const __m256 zero = _mm256_setzero_ps(), floor = _mm256_set1_ps(1e-12f), bin = _mm256_set1_ps(1.0f / 255.0f);
  const __m256 low_edge = _mm256_set1_ps(-0.999f), high_edge = _mm256_set1_ps(0.999f);
  const __m256 sqrt_alpha_bar = _mm256_set1_ps(c.sqrt_alpha_bar), sqrt_one_minus = _mm256_set1_ps(c.sqrt_one_minus);
  const __m256 one_minus_coef1 = _mm256_set1_ps(c.one_minus_coef1), coef2 = _mm256_set1_ps(c.coef2);
  const __m256 error_to_centred = _mm256_set1_ps(c.error_to_centred);
  const __m256 half_min_log = _mm256_set1_ps(c.half_min_log), quarter_delta = _mm256_set1_ps(c.quarter_delta);
  const __m256 mse_grad = _mm256_set1_ps(c.mse_grad), v_grad = _mm256_set1_ps(c.v_grad);
  __m256d mse_lo = _mm256_setzero_pd(), mse_hi = mse_lo, nll_lo = mse_lo, nll_hi = mse_lo;
  for (int64_t block = 0; block < n; block += kBlock) {
    __m256 mse_acc = zero, nll_acc = zero;
    const int64_t block_end = std::min(n, block + kBlock);
    for (int64_t i = block; i < block_end; i += kUnit) {
      const __m256 x = load8(x0 + i), e = load8(eps + i);
      const __m256 err = _mm256_sub_ps(load8(p + i), predicts_eps ? e : x);
      const __m256 x_t = _mm256_fmadd_ps(sqrt_alpha_bar, x, _mm256_mul_ps(sqrt_one_minus, e));
      const __m256 centred = _mm256_fmadd_ps(error_to_centred, err,
                                             _mm256_fmsub_ps(one_minus_coef1, x, _mm256_mul_ps(coef2, x_t)));
      const __m256 log_scale = _mm256_fmadd_ps(_mm256_add_ps(load8(v + i), _mm256_set1_ps(1.0f)), quarter_delta,
                                               half_min_log);
      const __m256 inv_stdv = exp8(_mm256_sub_ps(zero, log_scale));
      const __m256 plus_in = _mm256_mul_ps(inv_stdv, _mm256_add_ps(centred, bin));
      const __m256 min_in = _mm256_mul_ps(inv_stdv, _mm256_sub_ps(centred, bin));
      __m256 z_plus, cdf_plus, pdf_plus, z_min, cdf_min, pdf_min;
      approx_cdf8(plus_in, z_plus, cdf_plus, pdf_plus);
      approx_cdf8(min_in, z_min, cdf_min, pdf_min);
      // x0 < −0.999 and x0 > 0.999 as guided-diffusion compares (float x0 against the double constant): the float
      // nearest 0.999 lies above it, so the float comparisons are ≤ −0.999f and ≥ 0.999f.
      const __m256 left = _mm256_cmp_ps(x, low_edge, _CMP_LE_OQ), right = _mm256_cmp_ps(x, high_edge, _CMP_GE_OQ);
      const __m256 mass = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(z_min, z_plus), cdf_plus), cdf_min);
      const __m256 probability = _mm256_blendv_ps(_mm256_blendv_ps(mass, _mm256_mul_ps(z_min, cdf_min), right),
                                                  cdf_plus, left);
      const __m256 kept = _mm256_cmp_ps(probability, floor, _CMP_GT_OQ);
      nll_acc = _mm256_sub_ps(nll_acc, log8(_mm256_max_ps(probability, floor)));
      mse_acc = _mm256_fmadd_ps(err, err, mse_acc);
      if constexpr (kGrad) {
        // d log p / d log_scale: −pdf(plus)·plus_in from the upper bin edge, +pdf(min)·min_in from the lower.
        const __m256 upper = _mm256_andnot_ps(right, _mm256_mul_ps(pdf_plus, plus_in));
        const __m256 lower = _mm256_andnot_ps(left, _mm256_mul_ps(pdf_min, min_in));
        const __m256 dlog = _mm256_and_ps(kept, _mm256_div_ps(_mm256_sub_ps(lower, upper), probability));
        store8<false>(gp + i, _mm256_mul_ps(mse_grad, err));
        store8<false>(gv + i, _mm256_mul_ps(v_grad, _mm256_sub_ps(zero, dlog)));
      }
    }
    add_to_double(mse_acc, mse_lo, mse_hi);
    add_to_double(nll_acc, nll_lo, nll_hi);
  }
  mse += sum_double(mse_lo, mse_hi);
  nll += sum_double(nll_lo, nll_hi);
}
#endif  // BIASFAST_X86

// One decoder chunk: float inputs take the AVX2 body where it runs (a scalar double tail: the split depends only on
// the shape), double inputs and the generic variant the double path.
template <typename scalar_t>
void decoder_chunk(const scalar_t* p, const scalar_t* v, const scalar_t* x0, const scalar_t* eps, scalar_t* gp,
                   scalar_t* gv, int64_t n, const DecoderCoefs& c, bool predicts_eps, double& mse, double& nll) {
#ifdef BIASFAST_X86
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (use_avx2()) {
      BIASFAST_MARK_AVX2_BODY("hybrid_loss/decoder");
      const int64_t body = n / kUnit * kUnit;
      const DecoderCoefs8 c8 = decoder_coefs8(c, predicts_eps);
      if (gp) decoder_avx2<scalar_t, true>(p, v, x0, eps, gp, gv, body, c8, predicts_eps, mse, nll);
      else decoder_avx2<scalar_t, false>(p, v, x0, eps, gp, gv, body, c8, predicts_eps, mse, nll);
      const auto at = [](auto* ptr, int64_t k) { return ptr ? ptr + k : nullptr; };
      decoder_portable(p + body, v + body, x0 + body, eps + body, at(gp, body), at(gv, body), n - body, c,
                       predicts_eps, mse, nll);
      return;
    }
  }
#endif
  decoder_portable(p, v, x0, eps, gp, gv, n, c, predicts_eps, mse, nll);
}

RecycledBuffer gradient_buffer;

void check_inputs(const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise,
                  const at::Tensor& timesteps, const at::Tensor& table, const at::Tensor& weights) {
  BIASFAST_CHECK_ARG(model_output.dim() >= 2 && model_output.size(0) > 0 && model_output.numel() > 0, "model_output",
                     "expected a non-empty (batch, 2·channels, ...) tensor, got shape ", model_output.sizes());
  BIASFAST_CHECK_ARG(at::isFloatingType(model_output.scalar_type()), "model_output", "expected a floating dtype, got ",
                     model_output.scalar_type());
  BIASFAST_CHECK_ARG(model_output.size(1) % 2 == 0, "model_output", "expected an even channel count (the prediction, ",
                     "then as many variance channels v), got ", model_output.size(1), " channels");
  auto expected = model_output.sizes().vec();
  expected[1] /= 2;
  for (const auto& [t, name] : {std::pair{&x_start, "x_start"}, {&noise, "noise"}}) {
    BIASFAST_CHECK_ARG(t->sizes() == at::IntArrayRef(expected), name, "expected shape ", at::IntArrayRef(expected),
                       " (model_output with half its channels), got ", t->sizes());
    BIASFAST_CHECK_ARG(t->scalar_type() == model_output.scalar_type(), name, "dtype ", t->scalar_type(),
                       " does not match model_output's ", model_output.scalar_type());
  }
  BIASFAST_CHECK_ARG(!at::isFloatingType(timesteps.scalar_type()) && !timesteps.is_complex() &&
                         timesteps.scalar_type() != at::kBool,
                     "timesteps", "expected an integer dtype, got ", timesteps.scalar_type());
  BIASFAST_CHECK_ARG(timesteps.dim() == 1 && timesteps.size(0) == model_output.size(0), "timesteps",
                     "expected shape (", model_output.size(0), ",) (one per sample), got ", timesteps.sizes());
  BIASFAST_CHECK_ARG(table.dim() == 2 && table.size(0) >= 2 && table.size(1) == kColumns &&
                         table.scalar_type() == at::kDouble,
                     "table", "expected a float64 (T ≥ 2, ", static_cast<int64_t>(kColumns),
                     ") coefficient table (biasfast.ops.hybrid_loss.hybrid_loss_table), got ", table.scalar_type(),
                     " of shape ", table.sizes());
  BIASFAST_CHECK_ARG(weights.dim() == 1 && weights.size(0) == table.size(0), "weights",
                     "expected one weight per timestep, shape (", table.size(0), ",), got ", weights.sizes());
  BIASFAST_CHECK_ARG(at::isFloatingType(weights.scalar_type()), "weights", "expected a floating dtype, got ",
                     weights.scalar_type());
  for (const auto& [t, name] : {std::pair{&x_start, "x_start"}, {&noise, "noise"}, {&timesteps, "timesteps"},
                                {&table, "table"}, {&weights, "weights"}}) {
    BIASFAST_CHECK_ARG(t->device() == model_output.device(), name, "is on ", t->device(), " but model_output is on ",
                       model_output.device());
  }
}

void check_values(const double* table, const double* w, int64_t num_timesteps, const int64_t* t, int64_t batch) {
  for (int64_t k = 0; k < num_timesteps * kColumns; ++k) {
    BIASFAST_CHECK_ARG(std::isfinite(table[k]), "table", "entry (", k / kColumns, ", ", k % kColumns, ") is ",
                       table[k], " (must be finite: a schedule with ᾱ_t = 0 has no hybrid loss)");
  }
  for (int64_t k = 0; k < num_timesteps; ++k) {
    BIASFAST_CHECK_ARG(std::isfinite(w[k]) && w[k] >= 0, "weights", "entry ", k, " is ", w[k],
                       " (must be finite and non-negative)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    BIASFAST_CHECK_ARG(t[b] >= 0 && t[b] < num_timesteps, "timesteps", "entry ", b, " is ", t[b], ", outside [0, ",
                       num_timesteps, ") (the schedule has ", num_timesteps, " timesteps)");
  }
}

// A non-finite per-sample loss: name the input and row that caused it (inputs are read again only then).
template <typename scalar_t>
void explain_nonfinite(const scalar_t* out, const scalar_t* x0, const scalar_t* eps, int64_t b, int64_t n,
                       int64_t channels) {
  const auto first_bad = [n](const scalar_t* row) {
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(static_cast<double>(row[i]))) return i;
    }
    return int64_t{-1};
  };
  if (const int64_t i = first_bad(out + (2 * b + 1) * n); i >= 0) {
    BIASFAST_CHECK_ARG(false, "model_output", "the variance channels v (the last ", channels, ") of row ", b,
                       " hold ", static_cast<double>(out[(2 * b + 1) * n + i]), " at element ", i, " (v must be finite)");
  }
  for (const auto& [row, name] : {std::pair{out + 2 * b * n, "model_output"}, {x0 + b * n, "x_start"},
                                  {eps + b * n, "noise"}}) {
    if (const int64_t i = first_bad(row); i >= 0) {
      BIASFAST_CHECK_ARG(false, name, "row ", b, " holds ", static_cast<double>(row[i]), " at element ", i,
                         " (inputs must be finite)");
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hybrid_loss_cpu(
    const at::Tensor& model_output, const at::Tensor& x_start, const at::Tensor& noise, const at::Tensor& timesteps,
    const at::Tensor& table, const at::Tensor& weights, c10::string_view prediction, c10::string_view reduction,
    bool compute_grad) {
  select_cpu_isa("hybrid_loss");
  check_inputs(model_output, x_start, noise, timesteps, table, weights);
  const Prediction kind = parse_prediction(std::string_view(prediction.data(), prediction.size()));
  BIASFAST_CHECK_ARG(kind != Prediction::V, "prediction", "the hybrid loss supports 'epsilon' and 'sample' "
                     "(guided-diffusion's EPSILON and START_X), got 'v_prediction'");
  const bool predicts_eps = kind == Prediction::Epsilon;
  const Reduction mode = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const auto acc_type = accumulate_dtype(model_output.scalar_type());
  const int64_t batch = model_output.size(0), channels = model_output.size(1) / 2;
  const int64_t n = x_start.numel() / batch, num_timesteps = table.size(0);
  const at::Tensor out = model_output.contiguous(), x0 = x_start.contiguous(), eps = noise.contiguous();
  const at::Tensor t = timesteps.to(at::kLong).contiguous(), tab = table.contiguous();
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  at::Tensor grad = compute_grad ? gradient_buffer.like(out) : at::empty({0}, out.options());
  at::Tensor mse = at::empty({batch}, out.options().dtype(acc_type));
  at::Tensor vb = at::empty({batch}, mse.options());
  at::Tensor loss = mode == Reduction::kNone ? at::empty({batch}, mse.options()) : at::empty({}, mse.options());
  const double scale = mode == Reduction::kMean ? 1.0 / batch : 1.0;
  const double vb_scale = (num_timesteps / 1000.0) / (static_cast<double>(n) * kLn2);
  const bool stream = grad.numel() * grad.element_size() >= kStreamBytes;
  const double* tb = tab.data_ptr<double>();
  const double* wt = w.data_ptr<double>();
  const int64_t* ts = t.data_ptr<int64_t>();
  check_values(tb, wt, num_timesteps, ts, batch);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "hybrid_loss_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* px = x0.data_ptr<scalar_t>();
    const scalar_t* pe = eps.data_ptr<scalar_t>();
    scalar_t* pg = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    std::vector<KlCoefs<acc_t>> kl_coefs(batch);
    std::vector<DecoderCoefs> decoder_coefs(batch);
    for (int64_t b = 0; b < batch; ++b) {
      const double* row = tb + ts[b] * kColumns;
      const double delta = row[kMaxLog] - row[kMinLog];
      const double mse_grad = scale * wt[ts[b]] * 2.0 / n, v_grad = scale * vb_scale * delta / 4.0;
      const double diff = predicts_eps ? row[kCoef1] * row[kSqrtRecipm1AlphaBar] : row[kCoef1];
      kl_coefs[b] = {static_cast<acc_t>(mse_grad), static_cast<acc_t>(diff), static_cast<acc_t>(delta / 2),
                     static_cast<acc_t>(std::exp(-row[kMinLog])), static_cast<acc_t>(v_grad)};
      decoder_coefs[b] = {mse_grad, v_grad, row[kSqrtAlphaBar], row[kSqrtOneMinusAlphaBar], row[kSqrtRecipAlphaBar],
                          row[kSqrtRecipm1AlphaBar], row[kCoef1], row[kCoef2], row[kMinLog], row[kMaxLog]};
    }
    const int64_t per_sample = (n + kChunk - 1) / kChunk;
    std::vector<double> mse_part(batch * per_sample), vb_part(batch * per_sample);
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::min(n, kChunk));  // tiny problems stay serial
    at::parallel_for(0, batch * per_sample, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / per_sample, start = (task % per_sample) * kChunk;
        const int64_t len = std::min(kChunk, n - start);
        const scalar_t* p = po + 2 * b * n + start;
        const scalar_t* v = p + n;
        scalar_t* gp = pg ? pg + 2 * b * n + start : nullptr;
        scalar_t* gv = pg ? gp + n : nullptr;
        if (ts[b] == 0) {
          double m = 0, nll = 0;
          decoder_chunk(p, v, px + b * n + start, pe + b * n + start, gp, gv, len, decoder_coefs[b], predicts_eps,
                        m, nll);
          mse_part[task] = m;
          vb_part[task] = nll;
        } else {
          double m = 0, kl2 = 0;
          const scalar_t* target = (predicts_eps ? pe : px) + b * n + start;
          kl_chunk(p, v, target, gp, gv, 2 * b * n + start, len, kl_coefs[b], stream, m, kl2);
          mse_part[task] = m;
          vb_part[task] = 0.5 * kl2;  // kl2 accumulates 2·kl
        }
      }
      if (pg && stream) store_fence();
    });
    acc_t* mse_out = mse.data_ptr<acc_t>();
    acc_t* vb_out = vb.data_ptr<acc_t>();
    acc_t* loss_out = loss.data_ptr<acc_t>();
    double total = 0;
    for (int64_t b = 0; b < batch; ++b) {
      double m = 0, nll = 0;
      for (int64_t c = 0; c < per_sample; ++c) {
        m += mse_part[b * per_sample + c];
        nll += vb_part[b * per_sample + c];
      }
      m /= n;
      nll *= vb_scale;
      const double per = wt[ts[b]] * m + nll;
      if (!std::isfinite(per)) explain_nonfinite(po, px, pe, b, n, channels);
      mse_out[b] = static_cast<acc_t>(m);
      vb_out[b] = static_cast<acc_t>(nll);
      if (mode == Reduction::kNone) loss_out[b] = static_cast<acc_t>(per);
      total += per;
    }
    if (mode != Reduction::kNone) loss_out[0] = static_cast<acc_t>(total * scale);
  });
  return {loss, mse, vb, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("hybrid_loss", &hybrid_loss_cpu);
}

}  // namespace biasfast
