"""TEST-ONLY stand-in for `biasfast.knn` while the kNN engine (branch `knn`) is not merged: a float64 brute force
with the engine's API. Installed by tests/test_bias_score.py only when `biasfast.knn` does not exist."""

import torch


def brute_force_knn(query, ref, k=1, metric="l2", *, exclude_self=False, workspace_mb=256):
    q = torch.as_tensor(query).flatten(1)
    r = torch.as_tensor(ref).flatten(1)
    if metric == "hamming":
        d = (q[:, None, :] != r[None, :, :]).sum(-1).double()
    else:
        q, r = q.double(), r.double()
        if metric in ("l2", "sqeuclidean"):
            d = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
            d = d.sqrt() if metric == "l2" else d
        else:
            if metric == "pearson":
                q, r = q - q.mean(1, keepdim=True), r - r.mean(1, keepdim=True)
            d = (1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T).clamp_min(0)
    values, indices = d.sort(dim=1, stable=True)
    dtype = torch.float64 if torch.as_tensor(query).dtype == torch.float64 else torch.float32
    return values[:, :k].to(dtype), indices[:, :k]
