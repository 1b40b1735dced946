"""BIASFAST_CPU_ISA forces the CPU kernels' variant: each op, run in a subprocess under `generic` and under `avx2`,
matches the float64 reference in both, the two agree, the forced variant is the one reported, and a value the
CPU cannot honour (or an unknown one) is an error naming the variable at import."""

import os
import re
import subprocess
import sys

import pytest
import torch

import biasfast
from biasfast._core import extension
from biasfast.ops import reference
from tests.ops import test_hybrid_loss as hybrid_tests
from tests.ops import test_sampler_step as sampler_tests
from tests.ops import test_tree_bp as tree_bp_tests
from tests.cpu_features import CPU_VARIANTS, cpu_has_avx2, needs_avx2
from tests.ops.test_knn import assert_exact_knn
from tests.tolerances import assert_close_to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEDULE = biasfast.NoiseSchedule("linear", 1000)
SNR_WEIGHTS = biasfast.weighting("debias", SCHEDULE)
KNN_METRICS = ["l2", "cosine", "pearson"]
KNN_SIZES = {"fused": 24, "packed": 300}  # feature sizes on either side of the fused kernel's limit


# ---- the cases: inputs from a fixed seed (odd sizes, past one vector chunk), so both processes see the same ----


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _snr_inputs(dtype):
    g = _generator(1)
    shape = (3, 20001)  # more than one 16384-element chunk, a tail that is no multiple of 8
    pred, target = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    return pred, target, torch.randint(0, 1000, (3,), generator=g)


def _knn_inputs(dtype, d):
    g = _generator(2)
    return torch.randn(37, d, generator=g).to(dtype), torch.randn(531, d, generator=g).to(dtype)


def _hybrid_inputs(dtype):
    torch.manual_seed(3)
    # t = 0 (the decoder NLL body) beside t > 0 (the KL body), the schedule's ends included
    return hybrid_tests._inputs((5, 3, 9, 11), dtype, timesteps=torch.tensor([0, 1, 500, 998, 999]))


def _tree_bp_inputs(dtype):
    torch.manual_seed(5)  # problem() draws from the global generator
    return tree_bp_tests.problem(6, 4, 4, 1, 37, dtype)


def _cases() -> dict:
    """name -> a callable returning the op's outputs (a tuple of tensors) for that case's fixed inputs."""
    cases = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases[f"snr_loss/{dtype}"] = lambda dtype=dtype: torch.ops.biasfast.snr_loss(
            *_snr_inputs(dtype), SNR_WEIGHTS, "none", True)
    for dtype in (torch.float32, torch.bfloat16):
        for prediction in ("epsilon", "sample"):
            def hybrid(dtype=dtype, prediction=prediction):
                inputs = _hybrid_inputs(dtype)
                return torch.ops.biasfast.hybrid_loss(*inputs, hybrid_tests.TABLE, hybrid_tests.DEBIAS, prediction, "none",
                                                      True)
            cases[f"hybrid_loss/{dtype}/{prediction}"] = hybrid
    for variance, method in (("fixed_small", "ddim"), ("learned_range", "ddpm")):
        def step(variance=variance, method=method):
            make = sampler_tests._inputs if variance == "fixed_small" else sampler_tests._learned_inputs
            x, cond, uncond, noise, t, t_prev = make()
            return torch.ops.biasfast.sampler_step(x, cond, uncond, noise, t, t_prev,
                                                   SCHEDULE.table("cpu", torch.float64), method, "epsilon", 0.7, 3.5,
                                                   None, True, variance)
        cases[f"sampler_step/{variance}"] = step
    for dtype in (torch.float32, torch.float64):
        for path, d in KNN_SIZES.items():
            for metric in KNN_METRICS:
                cases[f"knn/{dtype}/{path}/{metric}"] = lambda dtype=dtype, d=d, metric=metric: torch.ops.biasfast.knn(
                    *_knn_inputs(dtype, d), 5, metric, 0, False, 64)
    for dtype in (torch.float32, torch.float64):
        cases[f"tree_bp/{dtype}"] = lambda dtype=dtype: torch.ops.biasfast.tree_bp(*_tree_bp_inputs(dtype))
    cases["sqdist"] = lambda: (torch.ops.biasfast.sqdist(*_knn_inputs(torch.float32, 33)),)
    cases["row_hash"] = lambda: (torch.ops.biasfast.row_hash(_knn_inputs(torch.float32, 33)[1]),)
    cases["knn_hamming"] = lambda: torch.ops.biasfast.knn_hamming(
        *(torch.randint(0, 4, (n, 45), generator=_generator(4), dtype=torch.int32) for n in (37, 531)), 3, 0, False)
    return cases


def _expected(name: str, outputs: tuple) -> None:
    """Assert one case's outputs against the float64 reference of the same (rounded) inputs."""
    op = name.split("/")[0]
    if op == "snr_loss":
        dtype = outputs[2].dtype
        pred, target, timesteps = _snr_inputs(dtype)
        p = pred.double().requires_grad_()
        loss = reference.snr_loss(p, target.double(), timesteps, SNR_WEIGHTS.double(), "none")
        (grad,) = torch.autograd.grad(loss.sum(), p)
        assert_close_to_reference(outputs[0], loss.detach(), dtype)
        scale = grad.abs().max()
        assert_close_to_reference(outputs[2].double() / scale, grad / scale, dtype)
    elif op == "hybrid_loss":
        prediction = name.split("/")[2]
        dtype = outputs[3].dtype
        inputs = _hybrid_inputs(dtype)
        loss, mse, vb, grad = hybrid_tests._oracle(*inputs, hybrid_tests.DEBIAS, prediction)
        for actual, expected in zip(outputs[:3], (loss, mse, vb)):
            hybrid_tests.assert_relative(actual, expected, hybrid_tests.VALUE_RTOL[dtype])
        hybrid_tests.assert_gradient_close(outputs[3], grad, dtype)
    elif op == "sampler_step":
        variance = name.split("/")[1]
        make = sampler_tests._inputs if variance == "fixed_small" else sampler_tests._learned_inputs
        method = "ddim" if variance == "fixed_small" else "ddpm"
        expected = sampler_tests._reference64(*make(), method, "epsilon", 0.7, 3.5, None, variance)
        for actual, want in zip(outputs, expected):
            sampler_tests._assert_relative(actual, want, 1e-6)
    elif op == "knn":
        _, _, path, metric = name.split("/")
        query, ref = _knn_inputs(outputs[0].dtype, KNN_SIZES[path])
        assert_exact_knn(*outputs, query, ref, 5, metric)
    elif op == "tree_bp":
        dtype = outputs[0].dtype
        marginals, log_z = reference.tree_bp(*(a.double() for a in _tree_bp_inputs(dtype)))
        assert_close_to_reference(outputs[0], marginals, dtype)
        assert_close_to_reference(outputs[1], log_z, dtype, scale=float(log_z.abs().max()))
    elif op == "sqdist":
        x, y = _knn_inputs(torch.float32, 33)
        assert_close_to_reference(outputs[0], reference.sqdist(x.double(), y.double()), torch.float32)
    elif op == "row_hash":
        rows = _knn_inputs(torch.float32, 33)[1]
        assert torch.equal(outputs[0], reference.row_hash(rows))
    elif op == "knn_hamming":
        query, ref = (torch.randint(0, 4, (n, 45), generator=_generator(4), dtype=torch.int32) for n in (37, 531))
        assert_exact_knn(*outputs, query, ref, 3, "hamming")
    else:
        raise AssertionError(f"no reference for case {name}")


# ---- the subprocess side ----


def main(path: str) -> None:
    """Run every case under the variant the environment forces; save the outputs, the variant each op ran and the
    AVX2 bodies each case ran."""
    outputs, bodies = {}, {}
    extension.take_avx2_bodies_ran()  # whatever import-time calls ran
    for name, run in _cases().items():
        outputs[name] = tuple(run())
        bodies[name] = extension.take_avx2_bodies_ran()
    torch.save({"isa": extension.cpu_isa(), "ran": extension.cpu_variants_ran(), "outputs": outputs,
                "bodies": bodies}, path)


def _run_variant(isa: str, tmp_path) -> dict:
    path = tmp_path / f"{isa}.pt"
    env = dict(os.environ, BIASFAST_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = "import sys; from tests.core.test_cpu_isa import main; main(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", script, str(path)], env=env, cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cpu_isa")
    isas = CPU_VARIANTS
    return {isa: _run_variant(isa, tmp_path) for isa in isas}


CASE_NAMES = list(_cases())


# The ops with one portable kernel: they run "generic" under either setting.
PORTABLE_ONLY = {"knn_hamming", "row_hash", "sqdist"}


def test_the_forced_variant_is_the_one_each_op_ran(variants):
    for isa, result in variants.items():
        assert result["isa"] == isa
        assert {"snr_loss", "hybrid_loss", "sampler_step", "knn", "tree_bp"} | PORTABLE_ONLY <= set(result["ran"])
        for op, ran in result["ran"].items():
            assert ran == ("generic" if op in PORTABLE_ONLY else isa), f"{op} ran {ran} under {isa}"


def test_the_variable_is_read_at_each_call(monkeypatch):
    # One process, two calls: each runs the variant the variable names at its call, and info() says so.
    pred, target = torch.randn(7, 301), torch.randn(7, 301)
    t, weights = torch.randint(0, 10, (7,)), torch.rand(10, dtype=torch.float64)
    isas = CPU_VARIANTS
    for isa in isas:
        monkeypatch.setenv("BIASFAST_CPU_ISA", isa)
        torch.ops.biasfast.snr_loss(pred, target, t, weights, "mean", True)
        assert extension.cpu_variants_ran()["snr_loss"] == isa
        assert extension.cpu_isa() == isa
        line = next(line for line in biasfast.info().splitlines() if line.split()[:1] == ["snr_loss"])
        assert f"C++ ({isa})" in line
    monkeypatch.setenv("BIASFAST_CPU_ISA", "sse2")
    with pytest.raises((ValueError, RuntimeError), match="BIASFAST_CPU_ISA='sse2' is not a CPU kernel variant"):
        torch.ops.biasfast.snr_loss(pred, target, t, weights, "mean", True)


@pytest.mark.parametrize("isa", ["generic", pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_variant_matches_the_float64_reference(variants, isa, name):
    _expected(name, variants[isa]["outputs"][name])


@needs_avx2
@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_variants_agree(variants, name):
    # Both sides hold the reference within the case's tolerance; here they must hold each other to the rounding
    # of their different summation orders (integer outputs, kNN indices included, exactly).
    generic, avx2 = variants["generic"]["outputs"][name], variants["avx2"]["outputs"][name]
    for a, b in zip(generic, avx2):
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{name}: the variants disagree"
            continue
        # kNN distances are exact float64 distances rounded once (the float64 row sums' orders differ); the
        # others carry their float32 (float64) accumulation; float16/bfloat16 outputs one rounding to them.
        exact = name.startswith("knn")
        rtol = {torch.float64: 1e-12, torch.float32: 1e-6 if exact else 1e-5}.get(a.dtype, 1e-2)
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * float(b.abs().max()))


def avx2_bodies(name: str) -> set[str]:
    """The AVX2 bodies a case runs under the avx2 variant. float64 kNN has none (both variants run the portable
    GEMM scan), and neither have the ops with one portable kernel."""
    op = name.split("/")[0]
    if op == "knn":
        _, dtype, path, _ = name.split("/")
        return {f"knn/{path}"} if dtype == str(torch.float32) else set()
    if op == "hybrid_loss":
        return {"hybrid_loss/kl", "hybrid_loss/decoder"}
    return set() if op in PORTABLE_ONLY else {op}


@pytest.mark.parametrize("isa", ["generic", pytest.param("avx2", marks=needs_avx2)])
def test_each_case_ran_the_forced_variants_code(variants, isa):
    # The label select_cpu_isa writes at an op's entry says what was asked; the marks inside the AVX2 branches say
    # what ran. Under generic no AVX2 body may run; under avx2 each case must run exactly its op's bodies.
    for name in CASE_NAMES:
        expected = avx2_bodies(name) if isa == "avx2" else set()
        assert set(variants[isa]["bodies"][name]) == expected, f"{name} under {isa}"


def test_this_process_reports_its_variant():
    assert extension.cpu_isa() in ("generic", "avx2")
    assert f"CPU kernels: {extension.cpu_isa()} variant" in biasfast.info()


@pytest.mark.parametrize("value,match", [
    ("sse2", r"BIASFAST_CPU_ISA='sse2' is not a CPU kernel variant; expected 'generic' or 'avx2'"),
    pytest.param("avx2", r"BIASFAST_CPU_ISA=avx2, but this CPU", marks=pytest.mark.skipif(
        cpu_has_avx2(), reason="this CPU has AVX2: the error is for CPUs without it")),
])
def test_bad_values_are_errors_naming_the_variable(value, match):
    result = subprocess.run([sys.executable, "-c", "import biasfast"], env=dict(os.environ, BIASFAST_CPU_ISA=value),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "ValueError" in result.stderr
    assert re.search(match, result.stderr), result.stderr[-2000:]
