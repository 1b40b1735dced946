"""biasfast.weighting against the notes' table (linear β 1e-4 → 0.02, T = 1000) and the source repositories' formulas."""

from decimal import Decimal

import pytest
import torch

import biasfast
from biasfast.diffusion.weighting import WEIGHTINGS

LINEAR = biasfast.NoiseSchedule("linear", 1000)
STEPS = [0, 10, 50, 100, 258, 500, 700, 999]

# Columns of the table in loss-weighting-and-samplers.md §1.2, as printed there (rounded to the digits shown).
TABLE = {
    ("debias", ()): ("0.0100 0.0469 0.176 0.342 1.000 3.44 12.0 157.4", "17.8"),
    ("p2", (("gamma", 1.0), ("k", 1.0))): ("1.0e-4 0.0022 0.030 0.105 0.500 0.922 0.993 1.000", "0.72"),
    ("p2", (("gamma", 0.5), ("k", 1.0))): ("0.0100 0.0468 0.173 0.324 0.707 0.960 0.997 1.000", "0.81"),
    ("min_snr", (("gamma", 5.0),)): ("5.0e-4 0.011 0.155 0.586 1 1 1 1", "0.91"),
    ("edm", ()): ("1.0 1.009 1.12 1.47 5.0 48 579 9.9e4", None),
}


def assert_rounds_to(value: float, printed: str) -> None:
    """`value` rounds to `printed`: within half a unit of its last printed digit."""
    half_unit = 0.5 * 10.0 ** Decimal(printed).as_tuple().exponent
    assert abs(value - float(printed)) <= half_unit * (1 + 1e-9), f"{value} does not round to {printed}"


@pytest.mark.parametrize("name,params", list(TABLE))
def test_epsilon_weights_match_the_notes_table(name, params):
    values, mean = TABLE[(name, params)]
    w = biasfast.weighting(name, LINEAR, **dict(params))
    assert w.dtype == torch.float64 and w.shape == (1000,)
    for t, printed in zip(STEPS, values.split()):
        assert_rounds_to(w[t].item(), printed)
    if mean is not None:
        assert_rounds_to(w.mean().item(), mean)


def test_debias_is_exactly_rsqrt_snr_of_the_unmasking_bias_code():
    # snr = 1/(1 − ᾱ) − 1 as in their gaussian_diffusion.py; weight = 1/sqrt(snr), no clamp. Their form
    # cancels at tiny SNR (t near 999), ours is ᾱ/(1 − ᾱ): equal to ~1e-12 relative.
    ac = LINEAR.alphas_cumprod
    expected = 1 / torch.sqrt(1.0 / (1 - ac) - 1)
    torch.testing.assert_close(biasfast.weighting("debias", LINEAR), expected, rtol=1e-11, atol=0)


def test_min_snr_variants_as_in_the_min_snr_code():
    snr = LINEAR.snr
    torch.testing.assert_close(biasfast.weighting("min_snr", LINEAR, "epsilon", gamma=5), snr.clamp(max=5) / snr)
    torch.testing.assert_close(biasfast.weighting("min_snr", LINEAR, "v_prediction", gamma=5), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(biasfast.weighting("min_snr", LINEAR, "sample", gamma=5), snr.clamp(max=5))


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_min_snr_diffusers_convention_is_min_snr_over_the_loss_target(prediction):
    # diffusers' scripts: min(SNR, γ), over SNR for ε, over SNR + 1 for v (not min(SNR + 1, γ)/(SNR + 1)).
    snr = LINEAR.snr
    x0 = snr.clamp(max=5)
    expected = {"epsilon": x0 / snr, "sample": x0, "v_prediction": x0 / (snr + 1)}[prediction]
    ours = biasfast.weighting("min_snr", LINEAR, prediction, gamma=5, convention="diffusers")
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, biasfast.weighting("min_snr", LINEAR, prediction, gamma=5), rtol=0, atol=0)


def test_min_snr_conventions_differ_only_at_zero_snr():
    """At SNR = 0 the Min-SNR code's guard gives every prediction weight 1; diffusers' scripts give v and x0
    min(0, γ) = 0, and ε its limit 1 (their 0/0)."""
    zero = biasfast.NoiseSchedule(LINEAR.alphas_cumprod.clone().index_fill_(0, torch.tensor([999]), 0.0))
    for prediction, terminal in (("epsilon", 1.0), ("sample", 0.0), ("v_prediction", 0.0)):
        ours = biasfast.weighting("min_snr", zero, prediction, gamma=5, convention="diffusers")
        code = biasfast.weighting("min_snr", zero, prediction, gamma=5)
        assert (ours[-1].item(), code[-1].item()) == (terminal, 1.0)
        torch.testing.assert_close(ours[:-1], code[:-1], rtol=0, atol=0)


def test_min_snr_code_x0_branch():
    snr = LINEAR.snr
    torch.testing.assert_close(biasfast.weighting("snr", LINEAR, "sample"), snr)
    torch.testing.assert_close(biasfast.weighting("inv_snr", LINEAR, "sample"), 1 / snr)
    torch.testing.assert_close(biasfast.weighting("truncated_snr", LINEAR, "sample"), snr.clamp(min=1))


def test_p2_formula():
    snr = LINEAR.snr
    torch.testing.assert_close(biasfast.weighting("p2", LINEAR, k=2.0, gamma=0.7), (2 + snr) ** -0.7)
    torch.testing.assert_close(biasfast.weighting("p2", LINEAR, gamma=0.0), torch.ones(1000, dtype=torch.float64))


def test_edm_weight_is_lambda_of_karras_in_x0_space():
    sigma = LINEAR.sigmas  # VE noise level σ = 1/√SNR; EDMLoss weight (σ² + σ_d²)/(σ·σ_d)² on the denoiser
    sd = 0.5
    expected = (sigma**2 + sd**2) / (sigma * sd) ** 2
    torch.testing.assert_close(biasfast.weighting("edm", LINEAR, "sample", sigma_data=sd), expected)


def test_soft_min_snr_matches_k_diffusion_c_weight():
    # k-diffusion weights its F-target loss by (σ·σ_d)²/(σ² + σ_d²)²; in x0 space divide by c_out².
    sigma, sd = LINEAR.sigmas, 0.5
    c_weight = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2
    c_out2 = (sigma * sd) ** 2 / (sigma**2 + sd**2)
    x0 = biasfast.weighting("soft_min_snr", LINEAR, "sample", gamma=1 / sd**2)
    torch.testing.assert_close(x0, c_weight / c_out2)


@pytest.mark.parametrize("name", [n for n in WEIGHTINGS if n != "constant"])
def test_predictions_convert_through_the_common_footing(name):
    snr = LINEAR.snr
    eps = biasfast.weighting(name, LINEAR, "epsilon")
    torch.testing.assert_close(biasfast.weighting(name, LINEAR, "sample"), eps * snr, rtol=1e-10, atol=0)
    torch.testing.assert_close(biasfast.weighting(name, LINEAR, "v_prediction"), eps * snr / (snr + 1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_constant_is_one_for_every_prediction(prediction):
    assert torch.equal(biasfast.weighting("constant", LINEAR, prediction), torch.ones(1000, dtype=torch.float64))


def test_max_weight_clamps():
    w = biasfast.weighting("debias", LINEAR, max_weight=5.0)
    assert w.max().item() == 5.0
    torch.testing.assert_close(w[:400], biasfast.weighting("debias", LINEAR)[:400])


def test_mean_rescales_the_table():
    w = biasfast.weighting("debias", LINEAR, mean=1.0)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(w * biasfast.weighting("debias", LINEAR).mean(), biasfast.weighting("debias", LINEAR))
    with pytest.raises(ValueError, match="mean"):
        biasfast.weighting("debias", LINEAR, mean=0.0)


ZERO_TERMINAL = biasfast.NoiseSchedule("scaled_linear", 1000, zero_terminal_snr=True)


@pytest.mark.parametrize("name", ["debias", "edm"])
def test_zero_terminal_snr_gets_a_default_clamp(name):
    w = biasfast.weighting(name, ZERO_TERMINAL)
    assert torch.isfinite(w).all()
    assert w[-1] == w[-2] == w.max()  # the largest finite weight
    assert biasfast.weighting(name, ZERO_TERMINAL, max_weight=100.0)[-1].item() == 100.0


@pytest.mark.parametrize("name", ["min_snr", "snr", "inv_snr", "truncated_snr"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_zero_terminal_snr_min_snr_family_uses_weight_one(name, prediction):
    w = biasfast.weighting(name, ZERO_TERMINAL, prediction)
    assert w[-1].item() == 1.0 and torch.isfinite(w).all()


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_every_weight_is_finite_and_nonnegative_on_zero_terminal_snr(name, prediction):
    w = biasfast.weighting(name, ZERO_TERMINAL, prediction)
    assert torch.isfinite(w).all() and (w >= 0).all()


def test_soft_min_snr_epsilon_limit_at_zero_snr_is_one():
    assert biasfast.weighting("soft_min_snr", ZERO_TERMINAL)[-1].item() == 1.0


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (("quadratic", LINEAR), {}, ValueError, "name: unknown weighting 'quadratic'"),
        (("debias", LINEAR, "x0"), {}, ValueError, "prediction: unknown 'x0'"),
        (("debias", "linear"), {}, TypeError, "schedule: expected a biasfast.NoiseSchedule"),
        (("min_snr", LINEAR), {"gamma": 0}, ValueError, "gamma: expected a finite number > 0"),
        (("min_snr", LINEAR), {"convention": "sd"}, ValueError, "convention: unknown 'sd'"),
        (("p2", LINEAR), {"k": -1.0}, ValueError, "k: expected a finite number ≥ 0"),
        (("edm", LINEAR), {"sigma_data": float("nan")}, ValueError, "sigma_data"),
        (("debias", LINEAR), {"max_weight": 0.0}, ValueError, "max_weight"),
        (("debias", LINEAR), {"gamma": 5}, TypeError, "weighting 'debias'.*gamma"),
        (("constant", LINEAR), {"k": 1}, TypeError, "weighting 'constant': unexpected parameters"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        biasfast.weighting(*args, **kwargs)
