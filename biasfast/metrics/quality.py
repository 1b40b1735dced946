"""Sample quality against held-out data: the sliced Wasserstein distance in pixel space and the FID in the feature
space of a small classifier trained on the data (a stand-in for Inception features on small digit images)."""

from __future__ import annotations

import os

import torch

from biasfast._core.io import load_checkpoint, save_atomic


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two image sets in pixel space (random unit directions, fixed seed).

    Each projection compares the two sets' quantile functions on a common grid, so the sets may differ in size.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    grid = (torch.arange(min(len(x), len(y)), dtype=torch.float64) + 0.5) / min(len(x), len(y))
    qx = torch.quantile(x @ directions, grid, dim=0)
    qy = torch.quantile(y @ directions, grid, dim=0)
    return float((qx - qy).abs().mean())


def feature_classifier(images: torch.Tensor, labels: torch.Tensor, cache: str, *, seed: int = 0,
                       steps: int = 300) -> torch.nn.Module:
    """A small MLP classifier of the training split (full-batch Adam, seeded), cached in `cache`; its penultimate
    layer is the feature space of the FID (a digit-specific stand-in for Inception features)."""
    classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(images[0].numel(), 128), torch.nn.SiLU(),
                                  torch.nn.Linear(128, 64), torch.nn.SiLU(), torch.nn.Linear(64, classes))
    if os.path.isfile(cache):
        net.load_state_dict(load_checkpoint(cache))
        return net.eval()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_atomic(net.state_dict(), cache)
    return net.eval()


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """||μx − μy||² + Tr(Σx + Σy − 2 (Σx Σy)^½) of two feature sets (the FID formula), in float64."""
    from scipy import linalg

    x, y = x.double(), y.double()
    cx, cy = torch.cov(x.T).numpy(), torch.cov(y.T).numpy()
    root = linalg.sqrtm(cx @ cy)
    root = root.real if hasattr(root, "real") else root
    return float((x.mean(0) - y.mean(0)).square().sum() + float(cx.trace() + cy.trace() - 2 * root.trace()))


def classifier_fid(classifier: torch.nn.Module, samples: torch.Tensor, reference: torch.Tensor) -> float:
    features = classifier[:-1]
    with torch.no_grad():
        return frechet_distance(features(samples.clamp(-1, 1)), features(reference))
