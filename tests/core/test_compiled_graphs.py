"""torch.compile(fullgraph=True) traces the compiled op itself: each public entry point's graph (forward and
backward, as AOTAutograd hands them to the compiler) calls exactly its biasfast op, on CPU tensors and, where a GPU
is present, on CUDA tensors (where the op's kernel is the CUDA C++ or the Triton one), never a Python
re-implementation; and the compiled result equals the eager one."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import biasfast
from biasfast._core import dispatch
from biasfast.diffusion.sampling import step
from tests.ops.test_tree_bp import problem

SCHEDULE = biasfast.NoiseSchedule("linear", 1000)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def biasfast_calls(fn, *args):
    """Compile `fn` with fullgraph=True, run it, and return (its result, the biasfast ops its graphs call)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    result = compiled(*args)
    if isinstance(result, torch.Tensor) and result.requires_grad:
        result.sum().backward()  # the backward graph is compiled on first use
    calls = [node.target.name() for gm in graphs for node in gm.graph.nodes
             if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
             and node.target.namespace == "biasfast"]
    return result, calls


def _snr(device):
    criterion = biasfast.nn.SNRWeightedLoss(SCHEDULE)
    pred = torch.randn(3, 2, 5, 7, device=device, requires_grad=True)
    return (lambda p, t, ts: criterion(p * 2, t, ts)), (pred, torch.randn(3, 2, 5, 7, device=device),
                                                           torch.tensor([0, 500, 999], device=device))


def _hybrid(device):
    criterion = biasfast.nn.HybridLoss(SCHEDULE, "debias")
    out = torch.randn(3, 4, 5, 7, device=device, requires_grad=True)
    x0, noise = torch.rand(3, 2, 5, 7, device=device) * 2 - 1, torch.randn(3, 2, 5, 7, device=device)
    return (lambda o, x, n, ts: criterion(o, x, n, ts)), (out, x0, noise, torch.tensor([0, 1, 999], device=device))


def _sampler(device):
    x, cond, noise = (torch.randn(3, 2, 5, 7, device=device) for _ in range(3))
    t, t_prev = torch.tensor([900, 500, 10], device=device), torch.tensor([800, 400, -1], device=device)
    return (lambda x, c, z, t, tp: step(x, c, t, tp, SCHEDULE, eta=1.0, noise=z)), (x, cond, noise, t, t_prev)


def _knn(device):
    return (lambda q, r: biasfast.knn(q, r, k=2, metric="cosine")), (torch.randn(9, 8, device=device),
                                                                      torch.randn(21, 8, device=device))


def _sqdist(device):
    return (lambda x, y: biasfast.sqdist(x, y).min(dim=1)), (torch.randn(9, 8, device=device),
                                                             torch.randn(21, 8, device=device))


def _row_hash(device):
    return (lambda x, y: torch.isin(biasfast.row_hash(x), biasfast.row_hash(y))), (
        torch.randn(9, 8, device=device), torch.randn(21, 8, device=device))


def _tree_bp(device):
    x_t, scale, grammar, top = (t.to(device) for t in problem(6, 4, 4, 0, 17, torch.float32))
    return (lambda x, s: torch.ops.biasfast.tree_bp(x, s, grammar, top)[0].argmax(-1)), (x_t, scale)


ENTRIES = {"snr_loss": _snr, "hybrid_loss": _hybrid, "sampler_step": _sampler, "knn": _knn, "sqdist": _sqdist,
           "row_hash": _row_hash, "tree_bp": _tree_bp}
EXPECTED_CALLS = {"row_hash": 2}  # one per input; every other entry calls its op once


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(ENTRIES))
def test_compiled_graph_calls_the_op(op, device):
    if device == "cuda":
        assert dispatch.implementation(op, "cuda") in ("CUDA C++", "Triton"), dispatch.implementation(op, "cuda")
    fn, args = ENTRIES[op](device)
    result, calls = biasfast_calls(fn, *args)
    assert calls, f"the compiled graph of {op} calls no biasfast op: it was traced through a Python fallback"
    assert {name.split(".")[0] for name in calls} == {f"biasfast::{op}"}, calls
    assert len(calls) == EXPECTED_CALLS.get(op, 1), calls
    eager = fn(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    for got, want in zip(torch.utils._pytree.tree_leaves(result), torch.utils._pytree.tree_leaves(eager)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_a_python_fallback_would_be_caught():
    # The check's own failure case: a function that computes the distances with torch (no biasfast op).
    _, calls = biasfast_calls(lambda x, y: torch.cdist(x, y).square().min(dim=1), torch.randn(9, 8),
                              torch.randn(21, 8))
    assert calls == []
