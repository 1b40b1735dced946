"""Noise schedules against their published definitions (diffusers, guided-diffusion, Nichol & Dhariwal)."""

import math

import pytest
import torch

from biasfast.diffusion.schedules import NoiseSchedule


def test_linear_matches_ddpm_definition():
    s = NoiseSchedule("linear", 1000)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.alphas_cumprod, expected, rtol=0, atol=0)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # Values tabulated in the loss-weighting notes (Unmasking-Bias setting): SNR(258) ≈ 1.001, SNR(999) ≈ 4.04e-5.
    assert s.snr[258].item() == pytest.approx(1.001, abs=2e-3)
    assert s.snr[999].item() == pytest.approx(4.04e-5, rel=1e-2)
    assert s.snr[0].item() == pytest.approx(9999, rel=1e-6)


def test_diffusion_lm_is_linear_rescaled_by_1000_over_T():
    s = NoiseSchedule("diffusion_lm", 500)
    torch.testing.assert_close(s.betas[[0, -1]], torch.tensor([2e-4, 0.04], dtype=torch.float64), rtol=1e-12, atol=0)


def test_scaled_linear_and_cosine():
    s = NoiseSchedule("scaled_linear", 1000)
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-9) and s.betas[-1].item() == pytest.approx(0.012, rel=1e-9)
    c = NoiseSchedule("cosine", 1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert c.betas[10].item() == pytest.approx(1 - f(11 / 1000) / f(10 / 1000), rel=1e-12)
    assert c.betas.max().item() == pytest.approx(0.999)  # capped
    assert c.snr[-1].item() < 1e-8


def test_zero_terminal_snr_rescale():
    s = NoiseSchedule("scaled_linear", 1000, zero_terminal_snr=True)
    base = NoiseSchedule("scaled_linear", 1000)
    assert s.snr[-1].item() == 0 and math.isinf(s.sigmas[-1].item())
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert (s.alphas_cumprod[1:] <= s.alphas_cumprod[:-1]).all()


def test_custom_table_and_derived_quantities():
    table = torch.linspace(0.99, 0.01, 37)
    s = NoiseSchedule(table)
    assert s.num_timesteps == 37
    torch.testing.assert_close(s.sigmas, ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt())
    torch.testing.assert_close(s.log_snr, torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod)))
    assert s.table("cpu").dtype == torch.float32 and s.table("cpu") is s.table("cpu")


@pytest.mark.parametrize(
    "spacing,expected",
    [("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
     ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
     ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])],
)
def test_respacing_matches_diffusers(spacing, expected):
    assert NoiseSchedule("linear").timesteps(10, spacing).tolist() == expected


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(schedule="quadratic"), ValueError, "unknown name 'quadratic'"),
        (dict(schedule="linear", num_timesteps=1), ValueError, "num_timesteps"),
        (dict(schedule=torch.tensor([0.5, 0.9])), ValueError, "non-increasing"),
        (dict(schedule=torch.tensor([0.5, float("nan")])), ValueError, "NaN"),
        (dict(schedule=torch.tensor([1.5, 0.2])), ValueError, r"\(0, 1\]"),
        (dict(schedule=[0.9, 0.5]), TypeError, "alphas_cumprod tensor"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        NoiseSchedule(**kwargs)


def test_bad_respacing():
    with pytest.raises(ValueError, match="steps"):
        NoiseSchedule("linear").timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        NoiseSchedule("linear").timesteps(10, "random")
