"""Plain-PyTorch versions of every biasfast kernel: the oracle of the tests and the baseline of the benchmarks.

They favour clarity over speed, accept any floating dtype (float64 included) and are never
used as a silent fallback by the public API.
"""

from __future__ import annotations

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
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM (fixed_small) or DDIM step as diffusers' `DDPMScheduler.step` / `DDIMScheduler.step` write it,
    with per-sample t, t_prev (B,) (t_prev = -1: ᾱ_prev = 1) and CFG ε = ε_u + s·(ε_c − ε_u). Returns (x_prev, x̂0).
    `use_clipped_model_output`: ε re-derived from the clipped x̂0, diffusers' DDIM option of that name."""
    view = (-1,) + (1,) * (x_t.dim() - 1)
    table = alphas_cumprod.to(x_t.device, x_t.dtype)
    alpha = table[t].view(view)
    alpha_prev = torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], torch.ones_like(table[t_prev])).view(view)
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
        variance = (beta_prev / beta * step_beta).clamp(min=1e-20)
        x_prev = x_prev + torch.where(t.view(view) > 0, variance**0.5, torch.zeros_like(variance)) * noise
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
