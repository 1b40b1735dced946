// Per-sample coefficients of the fused sampler step, in double (see csrc/cpu/sampler_step.cpp for the update).
// Formulas follow diffusers' DDPMScheduler.step (fixed_small or learned_range variance) and DDIMScheduler.step;
// kernels/sampler_step.py computes the same ones inside the Triton kernel.
#pragma once
#include <algorithm>
#include <cmath>
#include <string_view>

#include "common/checks.h"

namespace biasfast {

enum class Method { DDPM, DDIM };
enum class Prediction { Epsilon, Sample, V };
enum class Variance { FixedSmall, LearnedRange };

inline Method parse_method(std::string_view name) {
  if (name == "ddpm") return Method::DDPM;
  if (name == "ddim") return Method::DDIM;
  BIASFAST_CHECK_ARG(false, "method", "unknown '", name, "'; expected 'ddpm' or 'ddim'");
  return Method::DDIM;
}

inline Prediction parse_prediction(std::string_view name) {
  if (name == "epsilon") return Prediction::Epsilon;
  if (name == "sample") return Prediction::Sample;
  if (name == "v_prediction") return Prediction::V;
  BIASFAST_CHECK_ARG(false, "prediction", "unknown '", name, "'; expected 'epsilon', 'sample' or 'v_prediction'");
  return Prediction::Epsilon;
}

inline Variance parse_variance(std::string_view name) {
  if (name == "fixed_small") return Variance::FixedSmall;
  if (name == "learned_range") return Variance::LearnedRange;
  BIASFAST_CHECK_ARG(false, "variance", "unknown '", name, "'; expected 'fixed_small' or 'learned_range'");
  return Variance::FixedSmall;
}

// x̂0 = a0·x + b0·g,  ε̂ = a1·x + b1·g,  x_{t'} = p0·x̂0 + p1·ε̂ + p2·x + σ·z, where σ is `sigma` (fixed) or,
// with a learned variance v (the model output's second half), σ = exp(h0 + h1·v) per element.
struct SamplerCoefficients {
  double a0, b0, a1, b1, p0, p1, p2, sigma, h0, h1;
};

// alpha = ᾱ_t, alpha_prev = ᾱ_{t'} (1 at the final step); noisy_step = t > 0 (diffusers' DDPM adds noise only then).
// The step's β' = 1 − ᾱ_t/ᾱ_{t'} and posterior variance β̃' = (1 − ᾱ_{t'})/(1 − ᾱ_t)·β' are those of the respaced
// process whose steps are (t, t'), as guided-diffusion's SpacedDiffusion rebuilds them.
inline SamplerCoefficients sampler_coefficients(double alpha, double alpha_prev, bool noisy_step, Method method,
                                                Prediction prediction, double eta, Variance variance) {
  const double beta_bar = 1.0 - alpha, beta_bar_prev = 1.0 - alpha_prev;
  const double root_alpha = std::sqrt(alpha), root_beta_bar = std::sqrt(beta_bar);
  SamplerCoefficients c{};
  switch (prediction) {
    case Prediction::Epsilon:  // x̂0 = (x − √β̄·ε)/√ᾱ
      c.a0 = 1.0 / root_alpha, c.b0 = -root_beta_bar / root_alpha, c.a1 = 0.0, c.b1 = 1.0;
      break;
    case Prediction::Sample:  // ε̂ = (x − √ᾱ·x̂0)/√β̄
      c.a0 = 0.0, c.b0 = 1.0, c.a1 = 1.0 / root_beta_bar, c.b1 = -root_alpha / root_beta_bar;
      break;
    case Prediction::V:  // x̂0 = √ᾱ·x − √β̄·v, ε̂ = √ᾱ·v + √β̄·x
      c.a0 = root_alpha, c.b0 = -root_beta_bar, c.a1 = root_beta_bar, c.b1 = root_alpha;
      break;
  }
  if (method == Method::DDIM) {
    const double variance = (beta_bar_prev / beta_bar) * (1.0 - alpha / alpha_prev);
    c.sigma = eta * std::sqrt(variance);
    c.p0 = std::sqrt(alpha_prev);
    c.p1 = std::sqrt(std::max(0.0, 1.0 - alpha_prev - c.sigma * c.sigma));  // ≥ 0 up to rounding for eta ≤ 1
    c.p2 = 0.0;
  } else {
    const double step_alpha = alpha / alpha_prev, step_beta = 1.0 - step_alpha;
    c.p0 = std::sqrt(alpha_prev) * step_beta / beta_bar;
    c.p1 = 0.0;
    c.p2 = std::sqrt(step_alpha) * beta_bar_prev / beta_bar;
    const double posterior = std::max(beta_bar_prev / beta_bar * step_beta, 1e-20);
    c.sigma = noisy_step ? std::sqrt(posterior) : 0.0;
    if (variance == Variance::LearnedRange) {
      // LEARNED_RANGE: log σ² = frac·log β' + (1 − frac)·log β̃', frac = (v + 1)/2, so σ = exp(h0 + h1·v);
      // h0 = −inf gives σ = 0 exactly where no noise is added.
      const double max_log = std::log(step_beta), min_log = std::log(posterior);
      c.h0 = noisy_step ? 0.25 * (max_log + min_log) : -INFINITY;
      c.h1 = noisy_step ? 0.25 * (max_log - min_log) : 0.0;
    }
  }
  return c;
}

}  // namespace biasfast
