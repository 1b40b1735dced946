"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

import math

import torch


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances by direct differences, (n, d) x (m, d) -> (n, m)."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


# ---- SNR-weighted loss ----


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over non-batch dims of (pred − target)², in float32 (float64 for float64 inputs), as diffusers does."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


def snr_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """reduce_b( weights[timesteps[b]] · mean_i (pred_bi − target_bi)² ), reduction "mean", "sum" or "none"."""
    mse = per_sample_mse(pred, target)
    weighted = weights.to(mse.dtype)[timesteps] * mse
    if reduction == "none":
        return weighted
    return weighted.sum() if reduction == "sum" else weighted.mean()
# ---- learned-variance hybrid loss ----
# A step-by-step transcription of guided-diffusion (openai/guided-diffusion, guided_diffusion/losses.py and
# gaussian_diffusion.py: GaussianDiffusion.__init__'s tables, q_posterior_mean_variance, p_mean_variance with
# LEARNED_RANGE and clip_denoised=False, _vb_terms_bpd, training_losses with LossType.RESCALED_MSE), as the
# released Debias code trains (its weighted mse). In float64 it is the tests' oracle; in float32 it is what
# guided-diffusion computes (its _extract_into_tensor gathers the float64 tables as float32).


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (guided-diffusion losses.normal_kl)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that guided-diffusion's decoder likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood of images in [−1, 1] discretised to 256 bins, the outer bins open-ended (±0.999)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def hybrid_loss(
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weights: torch.Tensor | None = None,
    prediction: str = "epsilon",
    reduction: str = "mean",
    return_terms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduce_b( w_t·mean((target − pred)²) + vb_t·T/1000 ), model_output = [pred | v] along dim 1.

    With `return_terms`, also the per-sample unweighted mse and the rescaled vb (the term added to the loss).
    The vb term sees the mean through `detach()`, so its gradient reaches v only (guided-diffusion's frozen_out).
    """
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    out, x_start, noise = model_output.to(dtype), x_start.to(dtype), noise.to(dtype)
    num_timesteps = alphas_cumprod.numel()
    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

    def extract(table: torch.Tensor) -> torch.Tensor:
        return table.to(out.device)[timesteps].to(dtype).view(-1, *([1] * (out.dim() - 1)))

    x_t = extract(alphas_cumprod.sqrt()) * x_start + extract((1.0 - alphas_cumprod).sqrt()) * noise
    pred, model_var_values = torch.split(out, x_start.shape[1], dim=1)
    frozen = pred.detach()
    min_log = extract(posterior_log_variance_clipped)
    max_log = extract(torch.log(betas))
    frac = (model_var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    if prediction == "epsilon":
        pred_xstart = extract(torch.sqrt(1.0 / alphas_cumprod)) * x_t - extract(torch.sqrt(1.0 / alphas_cumprod - 1)) * frozen
    elif prediction == "sample":
        pred_xstart = frozen
    else:
        raise ValueError(f"prediction: expected 'epsilon' or 'sample', got {prediction!r}")
    model_mean = extract(posterior_mean_coef1) * pred_xstart + extract(posterior_mean_coef2) * x_t
    true_mean = extract(posterior_mean_coef1) * x_start + extract(posterior_mean_coef2) * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_log_variance).flatten(1).mean(1) / math.log(2.0)
    decoder_nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
    decoder_nll = decoder_nll.flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(timesteps.to(out.device) == 0, decoder_nll, kl) * (num_timesteps / 1000.0)
    target = noise if prediction == "epsilon" else x_start
    mse = ((target - pred) ** 2).flatten(1).mean(1)
    weight = torch.ones_like(mse) if weights is None else weights.to(out.device, dtype)[timesteps]
    per_sample = weight * mse + vb
    loss = per_sample if reduction == "none" else per_sample.sum() if reduction == "sum" else per_sample.mean()
    return (loss, mse, vb) if return_terms else loss


# ---- sampling ----

def sampler_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    method: str = "ddim",
    prediction: str = "epsilon",
    eta: float = 0.0,
    guidance_scale: float | None = None,
    uncond_output: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    clip_sample: float | None = None,
    variance: str = "fixed_small",
    use_clipped_model_output: bool = False,
    final_alpha_cumprod: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM (fixed_small or learned_range) or DDIM step as diffusers' `DDPMScheduler.step` /
    `DDIMScheduler.step` write it, with per-sample t, t_prev (B,) (t_prev = -1: ᾱ_prev = final_alpha_cumprod) and CFG
    ε = ε_u + s·(ε_c − ε_u). learned_range: model outputs (B, 2C, ...) split into the prediction and v, and
    log σ² = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2 (diffusers' `_get_variance`). `use_clipped_model_output`: ε re-derived from the clipped
    x̂0, diffusers' DDIM option of that name. Returns (x_prev, x̂0)."""
    log_variance_frac = None
    if variance == "learned_range":
        channels = x_t.shape[1]
        model_output, log_variance_frac = model_output[:, :channels], (model_output[:, channels:] + 1) / 2
        if uncond_output is not None:
            uncond_output = uncond_output[:, :channels]
    elif variance != "fixed_small":
        raise ValueError(f"variance: unknown {variance!r}")
    view = (-1,) + (1,) * (x_t.dim() - 1)
    table = alphas_cumprod.to(x_t.device, x_t.dtype)
    alpha = table[t].view(view)
    alpha_prev = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)],
                             torch.full_like(table[t_prev], final_alpha_cumprod)).view(view)
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    if guidance_scale is not None:
        model_output = uncond_output + guidance_scale * (model_output - uncond_output)
    if prediction == "epsilon":
        x0 = (x_t - beta**0.5 * model_output) / alpha**0.5
        eps = model_output
    elif prediction == "sample":
        x0 = model_output
        eps = (x_t - alpha**0.5 * x0) / beta**0.5
    elif prediction == "v_prediction":
        x0 = alpha**0.5 * x_t - beta**0.5 * model_output
        eps = alpha**0.5 * model_output + beta**0.5 * x_t
    else:
        raise ValueError(f"prediction: unknown {prediction!r}")
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    if use_clipped_model_output:
        eps = (x_t - alpha**0.5 * x0) / beta**0.5
    if method == "ddim":
        std = eta * ((beta_prev / beta) * (1 - alpha / alpha_prev)) ** 0.5
        x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + std * noise
    elif method == "ddpm":
        step_alpha = alpha / alpha_prev
        step_beta = 1 - step_alpha
        x_prev = (alpha_prev**0.5 * step_beta / beta) * x0 + (step_alpha**0.5 * beta_prev / beta) * x_t
        posterior = (beta_prev / beta * step_beta).clamp(min=1e-20)
        std = posterior**0.5
        if log_variance_frac is not None:
            log_variance = log_variance_frac * step_beta.log() + (1 - log_variance_frac) * posterior.log()
            std = torch.exp(0.5 * log_variance)
        x_prev = x_prev + torch.where(t.view(view) > 0, std, torch.zeros_like(std)) * noise
    else:
        raise ValueError(f"method: unknown {method!r}")
    return x_prev, x0
# ---- hierarchical model: belief propagation on the binary tree ----


def tree_bp(
    evidence: torch.Tensor, scale: torch.Tensor, grammar: torch.Tensor, top: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf marginals (B, L, q) and log partition (B,) of a k-filtered tree model, plain linear-space einsums.

    Leaf log-evidence is scale[b]·evidence[b] (B, L = 2^depth, q); `grammar` M[a, b, c] = P(b, c | a);
    `top` (2^k, q, q) holds P_j[a, b] = P(depth-k node j = b | root = a) (the identity for k = 0); uniform root.
    Messages are renormalised per node, their normalisers summed in log space.
    """
    batch, leaves, q = evidence.shape
    depth, k = leaves.bit_length() - 1, top.shape[0].bit_length() - 1
    field = scale[:, None, None] * evidence
    lead = field.amax(-1, keepdim=True)
    up = {depth: torch.exp(field - lead)}
    log_z = lead.sum((1, 2))

    def normalise(m: torch.Tensor) -> torch.Tensor:
        nonlocal log_z
        total = m.sum(-1, keepdim=True)
        log_z = log_z + total.log().sum((1, 2))
        return m / total

    for d in reversed(range(k, depth)):
        child = up[d + 1]
        up[d] = normalise(torch.einsum("abc,nib,nic->nia", grammar, child[:, 0::2], child[:, 1::2]))
    to_root = normalise(torch.einsum("jab,njb->nja", top, up[k]))
    log_z = log_z + (to_root.prod(1).sum(-1) / q).log()
    others = ~torch.eye(top.shape[0], dtype=torch.bool)
    cavity = torch.stack([to_root[:, others[j]].prod(1) for j in range(top.shape[0])], dim=1)
    down = torch.einsum("jab,nja->njb", top, cavity)
    for d in range(k, depth):
        down = down / down.sum(-1, keepdim=True)
        left, right = up[d + 1][:, 0::2], up[d + 1][:, 1::2]
        to_left = torch.einsum("nia,abc,nic->nib", down, grammar, right)
        to_right = torch.einsum("nia,abc,nib->nic", down, grammar, left)
        down = torch.stack([to_left, to_right], dim=2).reshape(batch, -1, q)
    belief = up[depth] * down
    return belief / belief.sum(-1, keepdim=True), log_z
# ---- exact k-nearest neighbours ----


def _unit_rows(x: torch.Tensor, center: bool) -> torch.Tensor:
    x = x - x.mean(dim=1, keepdim=True) if center else x
    return x / x.norm(dim=1, keepdim=True)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Full distance matrix by direct differences in the inputs' dtype (pass float64 for the oracle).

    cosine and pearson use 1 − cos = ‖û − v̂‖² / 2, which keeps its precision for near-duplicates.
    """
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if metric == "hamming":
        return (x[:, None, :] != y[None, :, :]).sum(-1).float()
    if metric in ("cosine", "pearson"):
        return sqdist(_unit_rows(x, metric == "pearson"), _unit_rows(y, metric == "pearson")) / 2
    d2 = sqdist(x, y)
    return d2.sqrt() if metric == "l2" else d2


def knn(
    query: torch.Tensor, ref: torch.Tensor, k: int = 1, metric: str = "l2", exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force k nearest neighbours, ties broken by the lower index; `exclude_self` drops index i for query i."""
    dist = pairwise_distances(query, ref, metric)
    if exclude_self:
        dist = dist.clone()
        dist[torch.arange(dist.shape[0]), torch.arange(dist.shape[0])] = float("inf")
    order = torch.argsort(dist, dim=1, stable=True)[:, :k]  # stable: equal distances keep index order
    return dist.gather(1, order), order

def knn_hamming(query: torch.Tensor, ref: torch.Tensor, k: int = 1, exclude_self: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force k nearest token rows under the Hamming distance (the oracle of `biasfast::knn_hamming`)."""
    return knn(query, ref, k, "hamming", exclude_self)


# ---- memorization metrics ----

_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    import numpy as np

    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_hash(rows: torch.Tensor) -> torch.Tensor:
    """The 64-bit row hash of `biasfast::row_hash` in NumPy uint64 (wrap-around) arithmetic, element by element."""
    import numpy as np

    rows = rows.detach().cpu()
    if rows.is_floating_point():
        rows = torch.where(rows == 0, torch.zeros_like(rows), rows)  # -0.0 hashes as 0.0
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    size = rows.element_size()
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
    bits = rows.contiguous().view(signed).numpy().view(unsigned).astype(np.uint64)
    n, d = bits.shape
    with np.errstate(over="ignore"):
        positions = (np.arange(1, d + 1, dtype=np.uint64) * np.uint64(_GOLDEN)).astype(np.uint64)
        sums = _mix64(bits + positions).sum(axis=1, dtype=np.uint64)
        hashes = _mix64(sums ^ np.uint64(d))
    return torch.from_numpy(hashes.view(np.int64).copy())
