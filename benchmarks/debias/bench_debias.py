"""Debiasing hot paths: the GroupDRO step and the Bias Amplifier's scoring of the real training set.

GroupDRO step = per-group mean loss + exponentiated-gradient weights + robust loss, forward + backward, on one
minibatch of per-sample losses: biasfast's `group_means` (index_add) + `group_dro_step` vs the group_DRO
repository's formulation (`loss.py`: a one-hot group map times the losses), eager and torch.compile'd.
Amplifier scoring = `BiasAmplifier.score` over the real training split (one no-grad batched pass) vs the same
1 − p(y|x) computed with autograd on (a training-loop style evaluation) and a torch.compile'd model.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import QUICK, shapes
from biasfast.debias.amplifier import BiasAmplifier
from biasfast.debias.rules import group_dro_step, group_means

GROUPS = 20  # class × {aligned, conflicting}
BATCHES = shapes(full=[128, 4096], quick=[37])
SCORED = shapes(full=[5090], quick=[61])  # 5090 = the benchmark's training split (1017 digits rendered 5×)


def _biasfast_step(losses, groups, weights):
    means, _ = group_means(losses, groups, GROUPS)
    return group_dro_step(weights, means, 0.01)


def _repo_step(losses, groups, weights):
    """kohpangwei/group_DRO `LossComputer.compute_group_avg` + `compute_robust_loss` (adjustment 0)."""
    group_map = (groups == torch.arange(GROUPS).unsqueeze(1)).float()
    counts = group_map.sum(1)
    means = group_map @ losses / (counts + (counts == 0).float())
    weights = weights * torch.exp(0.01 * means.detach())
    weights = weights / weights.sum()
    return weights, (weights * means).sum()


GROUP_DRO = {"biasfast": _biasfast_step, "reference": _repo_step, "compiled": torch.compile(_repo_step)}


@pytest.mark.parametrize("provider", ["biasfast", "reference"] + ([] if QUICK else ["compiled"]))
@pytest.mark.parametrize("batch", BATCHES)
def test_group_dro_step(bench, benchmark, provider, batch):
    benchmark.group = f"GroupDRO step fwd+bwd, batch {batch}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, 10, generator=g, requires_grad=True)
    labels = torch.randint(10, (batch,), generator=g)
    groups = labels * 2 + (torch.rand(batch, generator=g) < 0.05).long()
    weights = torch.full((GROUPS,), 1.0 / GROUPS)
    step = GROUP_DRO[provider]
    expected = _biasfast_step(F.cross_entropy(logits, labels, reduction="none"), groups, weights)[1]
    torch.testing.assert_close(step(F.cross_entropy(logits, labels, reduction="none"), groups, weights)[1], expected)

    def run():
        _, robust = step(F.cross_entropy(logits, labels, reduction="none"), groups, weights)
        torch.autograd.grad(robust, logits)

    bench(run, provider=provider, shape=str(batch), rounds=50)


def _scores_with_autograd(amplifier, images, labels):
    probs = amplifier.model(images).softmax(1)
    return 1.0 - probs.gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize("provider", ["biasfast", "reference"] + ([] if QUICK else ["compiled"]))
@pytest.mark.parametrize("n", SCORED)
def test_amplifier_score(bench, benchmark, provider, n):
    benchmark.group = f"BiasAmplifier.score, {n} real samples 3x8x8"
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(n, 3, 8, 8, generator=g), torch.randint(10, (n,), generator=g)
    amplifier = BiasAmplifier(width=16)
    amplifier.model.eval()
    if provider == "biasfast":
        fn = lambda: amplifier.score(images, labels)  # noqa: E731
    elif provider == "reference":
        fn = lambda: _scores_with_autograd(amplifier, images, labels)  # noqa: E731
    else:
        compiled = BiasAmplifier(width=16)
        compiled.model = torch.compile(amplifier.model)
        fn = lambda: compiled.score(images, labels)  # noqa: E731
    torch.testing.assert_close(fn().detach(), _scores_with_autograd(amplifier, images, labels).detach())
    bench(fn, provider=provider, shape=str(n), rounds=10)
