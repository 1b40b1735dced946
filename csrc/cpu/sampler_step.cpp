// Fused DDPM/DDIM sampler step with classifier-free guidance on the CPU: one pass that reads x_t, the
// (conditional, unconditional) model outputs and the noise once and writes x_{t'} (and optionally x̂0) once.
//
// Every method/prediction pair is linear per sample, so the host computes, once per sample and in double,
//   g   = u + s·(c − u)                        (c without guidance)
//   x̂0 = clamp(a0·x + b0·g, ±clip)            (clamp optional)
//   ε̂  = a1·x + b1·g
//   out = p0·x̂0 + p1·ε̂ + p2·x + σ·z
// following diffusers' DDPMScheduler.step and DDIMScheduler.step. With variance "learned_range" the model output is
// (B, 2C, ...): its first C channels are the prediction g, its last C the variance interpolation v, and the DDPM
// step's σ = exp(h0 + h1·v) per element (guided-diffusion's p_sample with LEARNED_RANGE); DDIM reads only g.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <string_view>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common/checks.h"
#include "common/isa.h"
#include "common/sampler_step_coefficients.h"

namespace biasfast {
namespace {

template <typename T>
struct StepCoefficients {
  T a0, b0, a1, b1, p0, p1, p2, sigma, h0, h1;
};

// learned: σ is read per element from the variance half of the model output (DDPM with learned_range only).
struct StepFlags {
  bool guided, clip, noisy, write_x0, learned;
};

template <typename T>
StepCoefficients<T> cast_coefficients(const SamplerCoefficients& c) {
  return {T(c.a0), T(c.b0), T(c.a1), T(c.b1), T(c.p0), T(c.p1), T(c.p2), T(c.sigma), T(c.h0), T(c.h1)};
}

// One sample's contiguous range [begin, end); the tail uses partial loads so every element sees the
// same arithmetic (results do not depend on where the range starts: batch-size invariance).
template <typename T>
void step_range(const T* x, const T* cond, const T* uncond, const T* var, const T* noise, T* out, T* x0_out,
                int64_t begin, int64_t end, const StepCoefficients<T>& k, T scale, T clip, const StepFlags& f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t lanes = Vec::size();
  const Vec a0(k.a0), b0(k.b0), a1(k.a1), b1(k.b1), p0(k.p0), p1(k.p1), p2(k.p2), sigma(k.sigma), s(scale);
  const Vec h0(k.h0), h1(k.h1);
  const Vec lo(-clip), hi(clip);
  for (int64_t i = begin; i < end; i += lanes) {
    const int64_t n = std::min(lanes, end - i);
    const Vec xv = Vec::loadu(x + i, n);
    Vec g = Vec::loadu(cond + i, n);
    if (f.guided) {
      const Vec u = Vec::loadu(uncond + i, n);
      g = at::vec::fmadd(s, g - u, u);
    }
    Vec x0 = at::vec::fmadd(b0, g, a0 * xv);
    if (f.clip) x0 = at::vec::clamp(x0, lo, hi);
    const Vec eps = at::vec::fmadd(b1, g, a1 * xv);
    Vec result = at::vec::fmadd(p0, x0, at::vec::fmadd(p1, eps, p2 * xv));
    if (f.noisy) {
      const Vec scale_z = f.learned ? at::vec::fmadd(h1, Vec::loadu(var + i, n), h0).exp() : sigma;
      result = at::vec::fmadd(scale_z, Vec::loadu(noise + i, n), result);
    }
    result.store(out + i, n);
    if (f.write_x0) x0.store(x0_out + i, n);
  }
}

// e^x in float for the learned-variance σ, written so the AVX2 loop auto-vectorises it (std::exp does not):
// Cephes' expf, x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial in r, times 2^n built in the exponent bits.
// Relative error ≤ 2e-7 (about 2 ulp); x is clamped to [−87, 88] (σ never comes near either end).
C10_ALWAYS_INLINE float exp_of(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

C10_ALWAYS_INLINE double exp_of(double x) { return std::exp(x); }

// Scalar form of the same update, with std::fma so every element rounds as the vector body does (fma is exact).
template <typename T, typename C>
C10_ALWAYS_INLINE void step_element(const T* x, const T* cond, const T* uncond, const T* var, const T* noise, T* out,
                                    T* x0_out, int64_t i, const StepCoefficients<C>& k, C s, C clip, bool guided,
                                    bool clipped, bool noisy, bool write_x0, bool learned) {
  const C xv = x[i];
  C g = cond[i];
  if (guided) g = std::fma(s, g - C(uncond[i]), C(uncond[i]));
  C x0 = std::fma(k.b0, g, k.a0 * xv);
  if (clipped) x0 = std::min(std::max(x0, -clip), clip);
  const C eps = std::fma(k.b1, g, k.a1 * xv);
  C result = std::fma(k.p0, x0, std::fma(k.p1, eps, k.p2 * xv));
  if (noisy) {
    const C scale_z = learned ? exp_of(std::fma(k.h1, C(var[i]), k.h0)) : k.sigma;
    result = std::fma(scale_z, C(noise[i]), result);
  }
  out[i] = T(result);
  if (write_x0) x0_out[i] = T(x0);
}

// float16/bfloat16: computed in float, element by element (CPU sampling in reduced precision is rare).
template <typename T>
void step_range_reduced(const T* x, const T* cond, const T* uncond, const T* var, const T* noise, T* out,
                        T* x0_out, int64_t begin, int64_t end, const StepCoefficients<float>& k, float s, float clip,
                        const StepFlags& f) {
  for (int64_t i = begin; i < end; ++i) {
    step_element(x, cond, uncond, var, noise, out, x0_out, i, k, s, clip, f.guided, f.clip, f.noisy, f.write_x0,
                 f.learned);
  }
}

// float32 on AVX2+FMA CPUs: the portable build's at::vec is SSE-width, so this loop is compiled for AVX2
// (auto-vectorised; flags are template parameters so the loop body has no branches) and chosen at run time.
// A learned variance's exp per element vectorises through exp_of.
template <bool kLearned, bool kGuided, bool kClip, bool kNoisy, bool kX0>
BIASFAST_AVX2 void step_range_avx2(const float* x, const float* cond, const float* uncond, const float* var,
                                   const float* noise, float* out, float* x0_out, int64_t begin, int64_t end,
                                   StepCoefficients<float> k, float s, float clip) {
  // Outputs may alias x_t exactly (in place), never partially: no loop-carried dependence either way.
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    step_element(x, cond, uncond, var, noise, out, x0_out, i, k, s, clip, kGuided, kClip, kNoisy, kX0, kLearned);
  }
}

using Avx2Range = void (*)(const float*, const float*, const float*, const float*, const float*, float*, float*,
                           int64_t, int64_t, StepCoefficients<float>, float, float);

template <size_t... I>
constexpr std::array<Avx2Range, sizeof...(I)> avx2_table(std::index_sequence<I...>) {
  return {&step_range_avx2<bool(I & 16), bool(I & 8), bool(I & 4), bool(I & 2), bool(I & 1)>...};
}

Avx2Range select_avx2(const StepFlags& f) {
  static constexpr auto table = avx2_table(std::make_index_sequence<32>{});
  return table[f.learned * 16 + f.guided * 8 + f.clip * 4 + f.noisy * 2 + f.write_x0];
}

template <typename scalar_t>
void run_step(const at::Tensor& x, const at::Tensor& cond, const at::Tensor& uncond, const at::Tensor& z,
              at::Tensor& out, at::Tensor& x0, const std::vector<SamplerCoefficients>& coefficients, double scale,
              double clip, const StepFlags& flags, bool two_halves) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), row = x.numel() / batch;
  std::vector<StepCoefficients<compute_t>> k(batch);
  for (int64_t b = 0; b < batch; ++b) k[b] = cast_coefficients<compute_t>(coefficients[b]);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* cp = cond.data_ptr<scalar_t>();
  const scalar_t* up = flags.guided ? uncond.data_ptr<scalar_t>() : nullptr;
  const scalar_t* zp = flags.noisy ? z.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* x0p = flags.write_x0 ? x0.data_ptr<scalar_t>() : nullptr;
  const compute_t s = compute_t(scale), c = compute_t(clip);
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / row, stop = std::min(end, (b + 1) * row);
      // With two halves (B, 2C, ...), element i of sample b has its prediction at i + b·row and its variance one
      // row later: shifted base pointers let the loops index every tensor with i.
      const int64_t shift = two_halves ? b * row : 0;
      const scalar_t* cb = cp + shift;
      const scalar_t* ub = up == nullptr ? nullptr : up + shift;
      const scalar_t* vb = flags.learned ? cb + row : nullptr;
      // A sample that gets no noise (t = 0: h0 = −inf) takes the fixed path, whose σ is exactly 0.
      StepFlags fb = flags;
      fb.learned = flags.learned && k[b].h0 > -std::numeric_limits<compute_t>::infinity();
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (use_avx2()) {
          BIASFAST_MARK_AVX2_BODY("sampler_step");
          select_avx2(fb)(xp, cb, ub, vb, zp, op, x0p, i, stop, k[b], s, c);
        } else {
          step_range<float>(xp, cb, ub, vb, zp, op, x0p, i, stop, k[b], s, c, fb);
        }
      } else if constexpr (std::is_same_v<scalar_t, compute_t>) {
        step_range<scalar_t>(xp, cb, ub, vb, zp, op, x0p, i, stop, k[b], s, c, fb);
      } else {
        step_range_reduced<scalar_t>(xp, cb, ub, vb, zp, op, x0p, i, stop, k[b], s, c, fb);
      }
      i = stop;
    }
  });
}

// `sizes`: x_t's shape, or with two halves (learned variance) x_t's with the channel dimension doubled.
void check_like(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name, at::IntArrayRef sizes) {
  if (!t.has_value()) return;
  BIASFAST_CHECK_ARG(t->defined(), name, "undefined tensor");
  BIASFAST_CHECK_ARG(t->sizes() == sizes, name, "shape ", t->sizes(), " does not match ", sizes,
                     sizes == x.sizes() ? " (x_t's shape)" : " (x_t's shape with 2C channels: learned_range)");
  BIASFAST_CHECK_ARG(t->scalar_type() == x.scalar_type(), name, "dtype ", t->scalar_type(), " does not match x_t's ",
                     x.scalar_type());
  BIASFAST_CHECK_ARG(t->device() == x.device(), name, "device ", t->device(), " does not match x_t's ", x.device());
}

std::vector<SamplerCoefficients> per_sample_coefficients(const at::Tensor& t, const at::Tensor& t_prev,
                                                         const at::Tensor& alphas_cumprod, Method method,
                                                         Prediction prediction, double eta, Variance variance,
                                                         double final_alpha, int64_t batch) {
  BIASFAST_CHECK_ARG(t.dim() == 1 && t.size(0) == batch, "t", "expected shape (", batch, "), got ", t.sizes());
  BIASFAST_CHECK_ARG(t_prev.dim() == 1 && t_prev.size(0) == batch, "t_prev", "expected shape (", batch, "), got ",
                     t_prev.sizes());
  BIASFAST_CHECK_ARG(alphas_cumprod.dim() == 1, "alphas_cumprod", "expected a 1-D table");
  const at::Tensor ti = t.to(at::kLong), tpi = t_prev.to(at::kLong);
  const at::Tensor table = alphas_cumprod.to(at::kDouble).contiguous();
  const int64_t steps = table.size(0);
  const auto tv = ti.accessor<int64_t, 1>();
  const auto tpv = tpi.accessor<int64_t, 1>();
  const double* alpha = table.data_ptr<double>();
  std::vector<SamplerCoefficients> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t now = tv[b], prev = tpv[b];
    BIASFAST_CHECK_ARG(0 <= now && now < steps, "t", "value ", now, " at index ", b, " is outside [0, ", steps, ")");
    BIASFAST_CHECK_ARG(-1 <= prev && prev < now, "t_prev", "value ", prev, " at index ", b,
                       " must satisfy -1 <= t_prev < t = ", now);
    const double target = prev >= 0 ? alpha[prev] : final_alpha;
    BIASFAST_CHECK_ARG(prev >= 0 || final_alpha >= alpha[now], "final_alpha_cumprod", "value ", final_alpha,
                       " is below alphas_cumprod[t = ", now, "] = ", alpha[now], " (the final step must denoise)");
    out[b] = sampler_coefficients(alpha[now], target, now > 0, method, prediction, eta, variance);
  }
  return out;
}

// Writes x_{t'} into `out` and, when `x0` is non-empty, x̂0 into `x0`. Either may be x_t itself (in place): each
// element is read before it is written at the same index, and the loops carry no other dependence.
void sampler_step_into(const at::Tensor& x_t, const at::Tensor& model_output,
                       const std::optional<at::Tensor>& uncond_output, const std::optional<at::Tensor>& noise,
                       const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                       std::string_view method, std::string_view prediction, double eta,
                       std::optional<double> guidance_scale, std::optional<double> clip_sample, at::Tensor& out,
                       at::Tensor& x0, std::string_view variance, double final_alpha_cumprod) {
  BIASFAST_CHECK_ARG(at::isFloatingType(x_t.scalar_type()), "x_t", "expected a floating dtype, got ",
                     x_t.scalar_type());
  BIASFAST_CHECK_ARG(x_t.dim() >= 1, "x_t", "expected a batch dimension");
  const Variance v = parse_variance(variance);
  const bool two_halves = v == Variance::LearnedRange;
  BIASFAST_CHECK_ARG(!two_halves || x_t.dim() >= 2, "x_t", "learned_range needs a channel dimension (B, C, ...)");
  std::vector<int64_t> model_sizes = x_t.sizes().vec();
  if (two_halves) model_sizes[1] *= 2;
  check_like(model_output, x_t, "model_output", model_sizes);
  check_like(uncond_output, x_t, "uncond_output", model_sizes);
  check_like(noise, x_t, "noise", x_t.sizes());
  const bool write_x0 = x0.numel() > 0;
  const auto check_output = [&](const at::Tensor& target, const char* name) {
    check_like(target, x_t, name, x_t.sizes());
    BIASFAST_CHECK_ARG(target.is_contiguous(), name, "expected a contiguous tensor");
    for (const at::Tensor* input : {&x_t, &model_output}) {
      BIASFAST_CHECK_ARG(at::get_overlap_status(target, *input) != at::MemOverlapStatus::Partial, name,
                         "partially overlaps an input; pass a separate tensor or the input itself");
    }
  };
  check_output(out, "out");
  if (write_x0) check_output(x0, "x0_out");
  const Method m = parse_method(method);
  const Prediction p = parse_prediction(prediction);
  BIASFAST_CHECK_ARG(guidance_scale.has_value() == uncond_output.has_value(), "uncond_output",
                     guidance_scale.has_value() ? "guidance_scale is set but uncond_output is missing"
                                                : "given without guidance_scale");
  BIASFAST_CHECK_ARG(0.0 <= eta && eta <= 1.0, "eta", "expected a value in [0, 1], got ", eta);
  BIASFAST_CHECK_ARG(noise.has_value() || (m == Method::DDIM && eta == 0.0), "noise",
                     "required when method is 'ddpm' or eta > 0");
  BIASFAST_CHECK_ARG(!clip_sample.has_value() || *clip_sample > 0, "clip_sample", "expected a positive bound, got ",
                     clip_sample.value_or(0));
  BIASFAST_CHECK_ARG(0.0 < final_alpha_cumprod && final_alpha_cumprod <= 1.0, "final_alpha_cumprod",
                     "expected a value in (0, 1], got ", final_alpha_cumprod);

  const int64_t batch = x_t.size(0);
  const auto coefficients =
      per_sample_coefficients(t, t_prev, alphas_cumprod, m, p, eta, v, final_alpha_cumprod, batch);
  if (x_t.numel() == 0) return;
  const at::Tensor x = x_t.contiguous(), cond = model_output.contiguous();
  const at::Tensor uncond = uncond_output.has_value() ? uncond_output->contiguous() : at::Tensor();
  const at::Tensor z = noise.has_value() ? noise->contiguous() : at::Tensor();
  const bool learned = two_halves && m == Method::DDPM;  // DDIM ignores a learned variance
  const StepFlags flags{uncond.defined(), clip_sample.has_value(), z.defined(), write_x0, learned};
  const double scale = guidance_scale.value_or(1.0), clip = clip_sample.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampler_step_cpu", [&] {
    run_step<scalar_t>(x, cond, uncond, z, out, x0, coefficients, scale, clip, flags, two_halves);
  });
}

// A fresh large output is mmap'd by malloc and first touched by the kernel, and its 4 KiB page faults cost more
// than the step itself; asking for transparent huge pages before the first touch removes most of them.
at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t bytes = out.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint; may fail
  }
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x_t, const at::Tensor& model_output,
                                                    const std::optional<at::Tensor>& uncond_output,
                                                    const std::optional<at::Tensor>& noise, const at::Tensor& t,
                                                    const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                                                    std::string_view method, std::string_view prediction, double eta,
                                                    std::optional<double> guidance_scale,
                                                    std::optional<double> clip_sample, bool return_x0,
                                                    std::string_view variance, double final_alpha_cumprod) {
  select_cpu_isa("sampler_step");
  at::Tensor out = empty_output(x_t);
  at::Tensor x0 = return_x0 ? empty_output(x_t) : at::empty({0}, x_t.options());
  sampler_step_into(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
                    guidance_scale, clip_sample, out, x0, variance, final_alpha_cumprod);
  return {out, x0};
}

void sampler_step_out_cpu(const at::Tensor& x_t, const at::Tensor& model_output,
                          const std::optional<at::Tensor>& uncond_output, const std::optional<at::Tensor>& noise,
                          const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& alphas_cumprod,
                          std::string_view method, std::string_view prediction, double eta,
                          std::optional<double> guidance_scale, std::optional<double> clip_sample, at::Tensor out,
                          at::Tensor x0_out, std::string_view variance, double final_alpha_cumprod) {
  select_cpu_isa("sampler_step.out");
  sampler_step_into(x_t, model_output, uncond_output, noise, t, t_prev, alphas_cumprod, method, prediction, eta,
                    guidance_scale, clip_sample, out, x0_out, variance, final_alpha_cumprod);
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("sampler_step", &sampler_step_cpu);
  m.impl("sampler_step.out", &sampler_step_out_cpu);
}

}  // namespace biasfast
