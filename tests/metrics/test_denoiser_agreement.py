"""biasfast.metrics.denoiser_agreement (the paper's Fig. 2) against a direct computation with the same noise."""

import pytest
import torch
import torch.nn.functional as F

import biasfast
from biasfast.metrics import denoiser_agreement


class _Denoiser(torch.nn.Module):
    """A small ε-predictor with dropout, so eval mode matters."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(self.conv(x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


class _Output:
    def __init__(self, sample):
        self.sample = sample


def _expected(model_a, model_b, x0, t, schedule, seed):
    alpha_bar = float(schedule.alphas_cumprod[t])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    steps = torch.full((x0.shape[0],), t)
    with torch.no_grad():
        return F.cosine_similarity(model_a(x_t, steps).flatten(1).double(), model_b(x_t, steps).flatten(1).double())


def test_matches_direct_computation_and_restores_modes():
    model_a, model_b = _Denoiser(0), _Denoiser(1)
    model_b.eval()
    schedule = biasfast.NoiseSchedule("linear", 1000)
    x_train, x_test = torch.randn(37, 3, 8, 8), torch.randn(21, 3, 8, 8)
    result = denoiser_agreement(model_a, model_b, x_train, x_test, 100, schedule, seed=3, batch_size=10)
    assert model_a.training and not model_b.training  # modes restored
    model_a.eval()
    train = _expected(model_a, model_b, x_train, 100, schedule, seed=3)
    test = _expected(model_a, model_b, x_test, 100, schedule, seed=4)
    torch.testing.assert_close(result.train_per_sample, train, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.test_per_sample, test, rtol=1e-5, atol=1e-6)
    assert result.train == pytest.approx(float(train.mean()), rel=1e-5)
    assert result.difference == pytest.approx(result.test - result.train, abs=1e-12)
    again = denoiser_agreement(model_a, model_b, x_train, x_test, torch.tensor(100), schedule, seed=3)
    assert again.train == pytest.approx(result.train, abs=1e-12) and again.t == 100  # fixed noise: deterministic


def test_identical_models_agree_everywhere_and_diffusers_outputs_work():
    model = _Denoiser(0)
    wrapped = lambda x, t: _Output(model(x, t))  # noqa: E731
    schedule = biasfast.NoiseSchedule("cosine", 200)
    result = denoiser_agreement(model, wrapped, torch.randn(5, 3, 4, 4), torch.randn(6, 3, 4, 4), 50, schedule)
    assert result.train == pytest.approx(1.0) and result.test == pytest.approx(1.0)
    assert result.difference == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(t=1000), ValueError, r"t: expected an int timestep in \[0, 1000\)"),
        (dict(t=-1), ValueError, "t: expected an int timestep"),
        (dict(x0_test=torch.randn(4, 3, 5, 5)), ValueError, "x0_test: image shape"),
        (dict(x0_train_a=torch.randn(0, 3, 4, 4)), ValueError, "x0_train_a: expected a non-empty batch"),
        (dict(x0_train_a=torch.ones(2, 3, 4, 4, dtype=torch.long)), TypeError, "x0_train_a: expected a floating"),
        (dict(schedule="linear"), TypeError, "schedule: expected a biasfast.NoiseSchedule"),
        (dict(model_b=lambda x, t: "no"), TypeError, "model_b: expected the model to return a tensor"),
        (dict(model_b=lambda x, t: x[:, :1]), ValueError, "model_a and model_b: predictions of shapes"),
    ],
)
def test_bad_input(kwargs, error, match):
    model = _Denoiser(0)
    args = dict(model_a=model, model_b=model, x0_train_a=torch.randn(3, 3, 4, 4), x0_test=torch.randn(2, 3, 4, 4),
                t=10, schedule=biasfast.NoiseSchedule("linear", 1000))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        denoiser_agreement(**args)
