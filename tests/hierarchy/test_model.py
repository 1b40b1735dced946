"""The filtered hierarchical model and its exact BP denoiser, against exhaustive enumeration."""

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from biasfast.ops import reference
from biasfast.hierarchy import FilteredHierarchicalModel, tree_bp
from tests.cpu_features import cpu_has_avx2
from tests.tolerances import assert_close_to_reference

SMALL = [(3, 2, 2), (3, 3, 2), (4, 2, 3), (4, 3, 3)]  # (q, depth, q_eff)
SMALL_K = [(q, depth, q_eff, k) for q, depth, q_eff in SMALL for k in range(depth + 1)]


def small_model(q, depth, q_eff, seed=3):
    return FilteredHierarchicalModel(q=q, depth=depth, sigma=1.3, q_eff=q_eff, seed=seed)


def noisy(model, n, alpha_bar, generator=None):
    x0 = torch.nn.functional.one_hot(model.sample(n, generator=generator), model.q).double()
    alpha = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1, 1)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * torch.randn(x0.shape, dtype=torch.float64)


def enumerated_posterior(model, x_t, alpha_bar, k=0):
    """Leaf marginals and log Z by summing over every sequence of the k-filtered model (log space)."""
    sequences, probs = model.enumerate(k)
    alpha = torch.as_tensor(alpha_bar, dtype=torch.float64).expand(x_t.shape[0])
    field = (alpha.sqrt() / (1 - alpha))[:, None, None] * x_t
    index = sequences.T[None].expand(x_t.shape[0], -1, -1)  # (B, L, S)
    scores = probs.log() + field.gather(2, index).sum(1)  # (B, S)
    weights = scores.softmax(-1)
    onehot = torch.nn.functional.one_hot(sequences, model.q).double()
    return torch.einsum("bs,sla->bla", weights, onehot), scores.logsumexp(-1)


# ---- grammar and sampling ----


def test_seed0_grammar_is_the_papers():
    # Values of the public generator `get_M_wforbidden(6, 1.0, 4)` after np.random.seed(0).
    model = FilteredHierarchicalModel()
    assert model.forbidden_pairs == [(3, 4), (2, 3), (4, 3), (5, 5), (2, 1), (0, 5), (0, 1), (2, 0), (0, 4),
                                     (3, 0), (0, 3), (0, 0)]
    for (a, b, c), value in [((0, 2, 4), 0.151183220627), ((0, 5, 0), 0.552929162214), ((1, 0, 2), 0.418164144779)]:
        assert model.grammar[a, b, c].item() == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("q,q_eff", [(6, 4), (5, 5), (4, 1)])
def test_grammar_structure(q, q_eff):
    model = FilteredHierarchicalModel(q=q, depth=2, q_eff=q_eff, seed=7)
    allowed = model.grammar > 0
    assert torch.equal(allowed.sum((1, 2)), torch.full((q,), q_eff))
    assert allowed.sum(0).max() <= 1  # every child pair has at most one parent: unambiguous
    torch.testing.assert_close(model.grammar.sum((1, 2)), torch.ones(q, dtype=torch.float64), rtol=0, atol=1e-15)
    assert len(model.forbidden_pairs) == q * (q - q_eff)
    assert all(not allowed[:, b, c].any() for b, c in model.forbidden_pairs)


def test_path_matrices_multiply_left_right_marginals():
    model = small_model(4, 3, 3)
    left, right = model.grammar.sum(2), model.grammar.sum(1)
    torch.testing.assert_close(model.path_matrices(0), torch.eye(4, dtype=torch.float64)[None])
    torch.testing.assert_close(model.path_matrices(2), torch.stack([left @ left, left @ right, right @ left, right @ right]))


def test_sampling_is_deterministic_per_seed_and_valid():
    a, b = FilteredHierarchicalModel(seed=5), FilteredHierarchicalModel(seed=5)
    first = a.sample(301)
    assert torch.equal(first, b.sample(301))
    assert not torch.equal(first, a.sample(301))  # the model's generator advances
    assert first.dtype == torch.int64 and first.shape == (301, 16)
    assert torch.isfinite(a.log_likelihood(first)).all()
    for k in (0, 2):
        assert a.sample(0, k=k).shape == (0, 16)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_sample_frequencies_match_enumeration(k):
    model = small_model(3, 2, 2)
    sequences, probs = model.enumerate(k)
    draws = model.sample(40_000, k=k, generator=torch.Generator().manual_seed(11))
    codes = model.encode(draws)
    counts = (codes[:, None] == model.encode(sequences)[None]).sum(0).double()
    assert counts.sum() == len(draws)  # nothing outside the support
    sd = (probs * (1 - probs) / len(draws)).sqrt()
    assert ((counts / len(draws) - probs).abs() <= 5 * sd + 1e-9).all()


def test_rows_and_split_are_reproducible_and_disjoint():
    model = small_model(4, 3, 3)
    torch.testing.assert_close(model.rows(5, 9000), model.rows(0, 10_000)[5:9000], rtol=0, atol=0)
    train0, test = model.split(700, 300, block=0)
    train1, _ = model.split(700, 300, block=1)
    assert train0.shape == (700, 8) and test.shape == (300, 8)
    assert torch.equal(train0, model.rows(0, 700)) and torch.equal(train1, model.rows(700, 1400))
    assert not torch.isin(model.encode(test), model.encode(train0)).any()


@pytest.mark.parametrize("q,depth,q_eff,k", SMALL_K)
def test_enumeration_is_a_distribution_and_matches_log_likelihood(q, depth, q_eff, k):
    model = small_model(q, depth, q_eff)
    sequences, probs = model.enumerate(k)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12) and (probs > 0).all()
    torch.testing.assert_close(model.log_likelihood(sequences, k=k), probs.log(), rtol=0, atol=1e-12)


def test_log_likelihood_of_impossible_sequences_is_minus_inf():
    model = small_model(4, 2, 2)
    b, c = model.forbidden_pairs[0]
    sequence = torch.tensor([[b, c, b, c]])
    assert model.log_likelihood(sequence).item() == -math.inf


# ---- exact inference against enumeration ----


@pytest.mark.parametrize("q,depth,q_eff,k", SMALL_K)
def test_denoisers_match_enumeration_float64(q, depth, q_eff, k):
    model = small_model(q, depth, q_eff)
    alpha = torch.rand(13, dtype=torch.float64) * 0.98 + 0.01  # one ᾱ per sample
    x_t = noisy(model, 13, alpha)
    expected, log_z = enumerated_posterior(model, x_t, alpha, k)
    out = model.filtered_denoiser(x_t, alpha, k) if k else model.exact_denoiser(x_t, alpha)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    evidence, scale = x_t, alpha.sqrt() / (1 - alpha)
    top = model.path_matrices(k)
    marginals, kernel_log_z = tree_bp(evidence, model.grammar, top, scale)
    torch.testing.assert_close(kernel_log_z, log_z, rtol=1e-13, atol=1e-12)
    ref_marginals, ref_log_z = reference.tree_bp(evidence, scale, model.grammar, top)
    torch.testing.assert_close(ref_marginals, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_log_z, log_z, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 2, 4])
def test_paper_model_low_precision_matches_float64_reference(dtype, k):
    model = FilteredHierarchicalModel()
    alpha = torch.rand(1001, dtype=torch.float64) * 0.9 + 0.05
    x_t = noisy(model, 1001, alpha).to(dtype)
    out = model.filtered_denoiser(x_t, alpha, k)
    assert out.dtype == torch.float32 and out.shape == x_t.shape
    scale = alpha.sqrt() / (1 - alpha)
    expected, _ = reference.tree_bp(x_t.double(), scale, model.grammar, model.path_matrices(k))
    assert_close_to_reference(out, expected, torch.float32)


def test_peaked_evidence_on_an_impossible_sequence_stays_exact():
    # At ᾱ → 1 every other sequence is exp(-thousands) less likely: linear-space messages underflow, so these
    # rows must go through the log-space path and still return the nearest valid sequences' posterior.
    # Log-potentials of size ~2000 carry ~2000·eps absolute error, hence 1e-10 rather than 1e-12 in float64.
    model = small_model(4, 3, 3)
    b, c = model.forbidden_pairs[0]
    tokens = torch.tensor([[b, c] * 4, [c, b] * 4])
    alpha = torch.tensor([0.999, 0.9995], dtype=torch.float64)
    x_t = torch.nn.functional.one_hot(tokens, 4).double() * alpha.sqrt()[:, None, None]
    expected, log_z = enumerated_posterior(model, x_t, alpha)
    for dtype, atol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        out = model.exact_denoiser(x_t.to(dtype), alpha)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    _, kernel_log_z = tree_bp(x_t, model.grammar, model.path_matrices(0), alpha.sqrt() / (1 - alpha))
    torch.testing.assert_close(kernel_log_z, log_z, rtol=1e-12, atol=0)


def test_clean_input_at_alpha_bar_one_is_recovered():
    model = FilteredHierarchicalModel()
    x0 = model.sample(9)
    out = model.exact_denoiser(torch.nn.functional.one_hot(x0, 6).float(), 1.0)
    torch.testing.assert_close(out, torch.nn.functional.one_hot(x0, 6).float())


def test_batch_dimensions_and_broadcast_alpha_bar():
    model = small_model(3, 2, 2)
    alpha = torch.tensor([[0.2], [0.7]], dtype=torch.float64).expand(2, 3)
    x_t = noisy(model, 6, alpha.reshape(-1)).reshape(2, 3, 4, 3)
    out = model.exact_denoiser(x_t, alpha)
    torch.testing.assert_close(out.reshape(6, 4, 3), enumerated_posterior(model, x_t.reshape(6, 4, 3), alpha.reshape(-1))[0])


@pytest.mark.parametrize("k", [0, 1])
def test_masked_posterior_matches_enumeration(k):
    model = small_model(4, 3, 3)
    tokens = model.sample(11, k=k)
    mask = torch.rand(11, 8) < 0.5
    sequences, probs = model.enumerate(k)
    agrees = ((sequences[None] == tokens[:, None]) | mask[:, None]).all(-1)  # (B, S)
    weights = probs * agrees
    expected = torch.einsum("bs,sla->bla", weights / weights.sum(1, keepdim=True),
                            torch.nn.functional.one_hot(sequences, 4).double())
    torch.testing.assert_close(model.masked_posterior(tokens, mask, k=k), expected, rtol=0, atol=1e-12)


def test_masked_posterior_rejects_impossible_observations():
    model = small_model(4, 2, 2)
    b, c = model.forbidden_pairs[0]
    with pytest.raises(ValueError, match=r"tokens: the unmasked tokens of rows \[0\]"):
        model.masked_posterior(torch.tensor([[b, c, 0, 0]]), torch.tensor([[False, False, True, True]]))


def test_posterior_samples_follow_the_exact_posterior():
    model = small_model(3, 2, 2)
    x_t = noisy(model, 1, 0.4)
    sequences, probs = model.enumerate()
    posterior = enumerated_posterior(model, x_t, 0.4)
    scores = probs.log() + (0.4**0.5 / 0.6 * x_t[0]).gather(1, sequences.T).sum(0)
    exact = scores.softmax(0)
    draws = model.sample_posterior(x_t.expand(30_000, -1, -1), 0.4, generator=torch.Generator().manual_seed(2))
    counts = (model.encode(draws)[:, None] == model.encode(sequences)[None]).sum(0).double()
    assert counts.sum() == len(draws)
    sd = (exact * (1 - exact) / len(draws)).sqrt()
    assert ((counts / len(draws) - exact).abs() <= 5 * sd + 1e-9).all()
    assert posterior[0].shape == (1, 4, 3)


# ---- the operator ----


def test_portable_path_matches_the_avx2_path():
    # BIASFAST_CPU_ISA forces the kernel's portable or AVX2+FMA build of the same code; each run reports the
    # variant it used, so neither side can silently be the other.
    script = (
        "import torch, biasfast, sys\n"
        "from biasfast._core import extension\n"
        "from biasfast.hierarchy import FilteredHierarchicalModel\n"
        "torch.manual_seed(0)\n"
        "m = FilteredHierarchicalModel()\n"
        "x = torch.nn.functional.one_hot(m.sample(203), 6) * 0.8 + 0.6 * torch.randn(203, 16, 6)\n"
        "out = [m.filtered_denoiser(x.to(d), 0.64, k) for d in (torch.float32, torch.float64) for k in (0, 3)]\n"
        "torch.save({'isa': extension.cpu_variants_ran()['tree_bp'], 'out': out}, sys.argv[1])\n"
    )
    results = []
    for isa in ("avx2", "generic"):
        if isa == "avx2" and not cpu_has_avx2():
            pytest.skip("this CPU has no AVX2+FMA+F16C")
        path = tempfile.mktemp(suffix=".pt")
        subprocess.run([sys.executable, "-c", script, path], check=True, env=dict(os.environ, BIASFAST_CPU_ISA=isa))
        result = torch.load(path, weights_only=True)
        os.remove(path)
        assert result["isa"] == isa
        results.append(result["out"])
    for fast, portable in zip(*results):
        torch.testing.assert_close(portable, fast, rtol=1e-5 if fast.dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    model = small_model(4, 3, 3)
    x_t = noisy(model, 10, 0.5).to(dtype)
    args = (x_t, torch.full((10,), 2.0, dtype=dtype), model.grammar.to(dtype), model.path_matrices(1).to(dtype))
    torch.library.opcheck(torch.ops.biasfast.tree_bp.default, args)


def test_torch_compile_fullgraph():
    model = FilteredHierarchicalModel()
    grammar, top = model.grammar.float(), model.path_matrices(0).float()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def denoise(x_t, scale):
        marginals, _ = tree_bp(x_t, grammar, top, scale)
        return marginals.argmax(-1)

    x_t, scale = noisy(model, 17, 0.6).float(), torch.full((17,), 0.6**0.5 / 0.4)
    expected, _ = reference.tree_bp(x_t.double(), scale.double(), model.grammar, model.path_matrices(0))
    assert torch.equal(denoise(x_t, scale), expected.argmax(-1))


def test_empty_batch():
    model = FilteredHierarchicalModel()
    assert model.exact_denoiser(torch.zeros(0, 16, 6), 0.5).shape == (0, 16, 6)
    assert model.log_likelihood(torch.zeros(0, 16, dtype=torch.long)).shape == (0,)


# ---- bad input ----


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(q_eff=7), ValueError, r"q_eff: must lie in \[1, q\]"),
        (dict(depth=0), ValueError, "depth: must be at least 1"),
        (dict(sigma=0.0), ValueError, "sigma: must be positive"),
        (dict(sigma=-1.0), ValueError, "sigma: must be positive"),
        (dict(q=1, q_eff=1), ValueError, "q: need at least 2"),
        (dict(depth=2.0), TypeError, "depth: expected an int"),
    ],
)
def test_bad_model_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FilteredHierarchicalModel(**kwargs)


def test_split_and_posterior_sampling_refuse_impossible_requests():
    model = FilteredHierarchicalModel(q=2, depth=1, q_eff=1, seed=0)  # support: 2 sequences
    with pytest.raises(ValueError, match="split: fewer than 5 test sequences"):
        model.split(50, 5)
    b, c = model.forbidden_pairs[0]
    with pytest.raises(ValueError, match=r"x_t: rows \[0\] at alpha_bar = 1"):
        model.sample_posterior(torch.nn.functional.one_hot(torch.tensor([[b, c]]), 2).float(), 1.0)


def test_bad_inference_inputs_name_the_argument():
    model = FilteredHierarchicalModel()
    good = torch.zeros(3, 16, 6)
    cases = [
        (lambda: model.exact_denoiser(torch.zeros(3, 15, 6), 0.5), ValueError, r"x_t: expected shape \(\.\.\., 16, 6\)"),
        (lambda: model.exact_denoiser(torch.zeros(16), 0.5), ValueError, "x_t: expected shape"),
        (lambda: model.exact_denoiser(good.long(), 0.5), TypeError, "x_t: expected a floating-point"),
        (lambda: model.exact_denoiser(good, 0.0), ValueError, r"alpha_bar: must lie in \(0, 1\]"),
        (lambda: model.exact_denoiser(good, 1.5), ValueError, r"alpha_bar: must lie in \(0, 1\]"),
        (lambda: model.exact_denoiser(good, torch.rand(4)), ValueError, "alpha_bar: shape"),
        (lambda: model.exact_denoiser(good.index_fill(1, torch.tensor([2]), math.nan), 0.5), ValueError,
         "x_t: contains NaN"),
        (lambda: model.filtered_denoiser(good, 0.5, 5), ValueError, r"k: the filtering level must be an int in \[0, depth\]"),
        (lambda: model.log_likelihood(torch.full((2, 16), 6)), ValueError, r"sequences: tokens must lie in \[0, 6\)"),
        (lambda: model.log_likelihood(torch.full((2, 16), -1)), ValueError, r"sequences: tokens must lie in \[0, 6\)"),
        (lambda: model.log_likelihood(torch.zeros(2, 8, dtype=torch.long)), ValueError, r"sequences: expected shape \(batch, 16\)"),
        (lambda: model.log_likelihood(torch.zeros(2, 16)), TypeError, "sequences: expected an integer tensor"),
        (lambda: model.masked_posterior(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16)), ValueError,
         "mask: expected a bool tensor"),
        (lambda: model.sample(-1), ValueError, "n: expected a non-negative int"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_operator_rejects_bad_shapes_with_named_arguments():
    q = 4
    ev, scale, grammar, top = torch.zeros(2, 8, q), torch.ones(2), torch.rand(q, q, q), torch.eye(q)[None]
    for args, match in [
        ((torch.zeros(2, 6, q), scale, grammar, top), "'evidence': the number of leaves must be a power of two"),
        ((ev, torch.ones(3), grammar, top), "'scale': expected shape"),
        ((ev, scale, torch.rand(q, q, 3), top), "'grammar': expected shape"),
        ((ev, scale, grammar, torch.rand(3, q, q)), "'top': expected shape"),
        ((ev, scale, grammar, torch.rand(16, q, q)), "'top': expected shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            torch.ops.biasfast.tree_bp(*args)
