// Per-sample coefficients of the fused sampler step, in double (see csrc/cpu/sampler_step.cpp for the update).
// Formulas follow diffusers' DDPMScheduler.step (fixed_small variance) and DDIMScheduler.step;
// kernels/sampler_step.py computes the same ones inside the Triton kernel.
#pragma once
#include <algorithm>
#include <cmath>
#include <string_view>

#include "common/checks.h"

namespace biasfast {

enum class Method { DDPM, DDIM };
enum class Prediction { Epsilon, Sample, V };

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

// x̂0 = a0·x + b0·g,  ε̂ = a1·x + b1·g,  x_{t'} = p0·x̂0 + p1·ε̂ + p2·x + σ·z.
struct SamplerCoefficients {
  double a0, b0, a1, b1, p0, p1, p2, sigma;
};

// alpha = ᾱ_t, alpha_prev = ᾱ_{t'} (1 at the final step); noisy_step = t > 0 (diffusers' DDPM adds noise only then).
inline SamplerCoefficients sampler_coefficients(double alpha, double alpha_prev, bool noisy_step, Method method,
                                                Prediction prediction, double eta) {
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
    c.sigma = noisy_step ? std::sqrt(std::max(beta_bar_prev / beta_bar * step_beta, 1e-20)) : 0.0;
  }
  return c;
}

}  // namespace biasfast
