"""diffusers as it is: schedules read from its schedulers, its models sampled and trained directly, and biasfast's
loops equal to diffusers' own scheduler loops from the same x_T and noise (models built from configs, no downloads).
"""

from __future__ import annotations

import copy
import re
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

import biasfast  # noqa: E402
from biasfast.diffusion.losses import SNRWeightedLoss  # noqa: E402
from biasfast.diffusion.models import denoise  # noqa: E402
from biasfast.diffusion.sampling import keyed_normal  # noqa: E402
from biasfast.diffusion.schedules import NoiseSchedule  # noqa: E402
from biasfast.diffusion.training import Trainer, TrainConfig  # noqa: E402
from biasfast.metrics.agreement import denoiser_agreement  # noqa: E402

SHAPE = (1, 8, 8)


def float32_bound(schedule: NoiseSchedule, steps: int, scale: float) -> float:
    """What float32 rounding can separate two correct loops by: one ulp per step, amplified by the largest
    1/sqrt(ᾱ) that turns a model output into x̂0, times the size of the values."""
    return torch.finfo(torch.float32).eps * steps * float(schedule.alphas_cumprod.rsqrt().max()) * max(1.0, scale)


def tiny_unet(seed: int = 0, **extra) -> UNet2DModel:
    """A 2-level UNet2DModel of ~40k weights, built from a config; a random-weight denoiser is enough to compare
    two samplers step by step (both see the same model outputs)."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **extra).eval()


def test_schedule_reads_the_scheduler_config():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                              timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True,
                              clip_sample=True, clip_sample_range=2.0)
    for schedule in (NoiseSchedule.from_diffusers(scheduler), NoiseSchedule(scheduler), biasfast.NoiseSchedule(scheduler)):
        torch.testing.assert_close(schedule.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=0)
        assert (schedule.prediction, schedule.spacing, schedule.steps_offset) == ("v_prediction", "trailing", 1)
        assert schedule.zero_terminal_snr and schedule.snr[-1] == 0 and schedule.clip_sample == 2.0
        assert schedule.set_alpha_to_one and schedule.final_alpha_cumprod == 1.0
    plain = NoiseSchedule(DDPMScheduler(clip_sample=False))
    assert plain.clip_sample is None and not plain.zero_terminal_snr and plain.prediction == "epsilon"
    torch.testing.assert_close(plain.alphas_cumprod, NoiseSchedule("linear").alphas_cumprod, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_timesteps_equal_the_schedulers(kind, spacing, offset):
    scheduler = kind(timestep_spacing=spacing, steps_offset=offset)
    schedule = NoiseSchedule(scheduler)
    for steps in (7, 50, 333):
        scheduler.set_timesteps(steps)
        assert schedule.timesteps(steps).tolist() == scheduler.timesteps.tolist(), (spacing, offset, steps)


def test_schedule_errors():
    with pytest.raises(TypeError, match="scheduler: expected a diffusers scheduler"):
        NoiseSchedule.from_diffusers(object())
    with pytest.raises(TypeError, match="schedule: expected a name, an alphas_cumprod tensor or a diffusers"):
        NoiseSchedule(3.0)
    with pytest.raises(ValueError, match="ddim_previous: unknown 'previous'"):
        NoiseSchedule("linear", ddim_previous="previous")
    with pytest.raises(TypeError, match="set_alpha_to_one: expected a bool, got int"):
        NoiseSchedule("linear", set_alpha_to_one=0)
    with pytest.raises(ValueError, match="prediction: unknown 'flow'"):
        NoiseSchedule("linear", prediction="flow")
    with pytest.raises(ValueError, match="steps: 1000 leading steps with steps_offset 1 reach timestep 1000"):
        NoiseSchedule(DDPMScheduler(steps_offset=1)).timesteps(1000)


def _diffusers_ddim(unet, scheduler, x_T, steps, eta, noises):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for k, t in enumerate(scheduler.timesteps):
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, eta=eta, variance_noise=noises[k] if eta > 0 else None).prev_sample
    return x


def _ddim_both_ways(unet, scheduler, n, steps, eta, seed):
    """diffusers' DDIM loop and biasfast's on the schedule read from the scheduler, from the same keyed x_T and
    noise: (biasfast's, diffusers', x_T, the float32 bound between them, the sampling options)."""
    schedule = NoiseSchedule(scheduler)
    x_T = keyed_normal(seed, range(n), 0, SHAPE, torch.device("cpu"), torch.float32)
    noises = [keyed_normal(seed, range(n), k + 1, SHAPE, torch.device("cpu"), torch.float32) for k in range(steps)]
    with torch.no_grad():
        expected = _diffusers_ddim(unet, scheduler, x_T, steps, eta, noises)
    options = dict(steps=steps, method="ddim", eta=eta, seed=seed, progress=False)
    ours = biasfast.sample(unet, (n, *SHAPE), schedule, **options)
    # float32 on both sides (diffusers' coefficients too); the fused step orders its arithmetic differently
    return ours, expected, x_T, float32_bound(schedule, steps, float(expected.abs().max())), options


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [dict(), dict(timestep_spacing="trailing", prediction_type="v_prediction"),
                                    dict(steps_offset=1, clip_sample=False)])
def test_ddim_loop_equals_diffusers(eta, config, one_thread):
    ours, expected, x_T, bound, _ = _ddim_both_ways(tiny_unet(), DDIMScheduler(**config), 3, 25, eta, 11)
    assert (ours - expected).abs().max() <= bound < (expected - x_T).abs().max()


def test_ddim_loop_on_a_zero_terminal_snr_schedule_equals_diffusers(one_thread):
    """Lin et al.'s setting: ᾱ rescaled to 0 at t = T − 1, trailing spacing, v-prediction, DDIM η = 0. The first
    step starts at SNR = 0, where x̂0 = −v̂ exactly (no 1/√ᾱ), so float32 separates the loops by the rounding of
    the other steps: the bound uses the largest 1/√ᾱ below the terminal step. (With η = 1 diffusers' first step is
    NaN: σ² = 1 − ᾱ_prev there, and 1 − ᾱ_prev − (√σ²)² rounds below 0 under its square root; biasfast's stays
    finite.)"""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction")
    ours, expected, x_T, _, options = _ddim_both_ways(tiny_unet(7), scheduler, 3, 10, 0.0, 9)
    schedule = NoiseSchedule(scheduler)
    stochastic = biasfast.sample(tiny_unet(7), (3, *SHAPE), schedule, **{**options, "eta": 1.0})
    assert torch.isfinite(stochastic).all()
    assert schedule.zero_terminal_snr and float(schedule.alphas_cumprod[-1]) == 0.0
    finite = NoiseSchedule(schedule.alphas_cumprod[:-1])
    bound = float32_bound(finite, 10, float(expected.abs().max()))
    assert (ours - expected).abs().max() <= bound < (expected - x_T).abs().max()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_ddim_without_alpha_one_ends_where_diffusers_does(spacing, offset, eta, one_thread):
    """DDIMScheduler(set_alpha_to_one=False) (Stable Diffusion's) makes its last step land on ᾱ_0, not on x̂0 (its
    `final_alpha_cumprod`); a schedule read from it does the same, and differs from the ᾱ = 1 ending by far more
    than float32 rounding (0.011 on these samples before biasfast read the option)."""
    unet = tiny_unet(3)
    scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=False)
    schedule = NoiseSchedule(scheduler)
    assert not schedule.set_alpha_to_one and schedule.final_alpha_cumprod == float(scheduler.alphas_cumprod[0])
    ours, expected, _, bound, options = _ddim_both_ways(unet, scheduler, 3, 10, eta, 5)
    assert (ours - expected).abs().max() <= bound
    settings = dict(spacing=spacing, steps_offset=offset, clip_sample=schedule.clip_sample, ddim_previous="stride")
    to_one = biasfast.sample(unet, (3, *SHAPE), NoiseSchedule(scheduler.alphas_cumprod, **settings), **options)
    assert (to_one - expected).abs().max() > 10 * bound


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,steps", [("linspace", 25), ("trailing", 7), ("leading", 7)])
def test_ddim_steps_like_the_scheduler_whatever_its_spacing(spacing, steps, eta, one_thread):
    """diffusers' DDIMScheduler.step goes from t to t − T//steps (scheduling_ddim.py, `prev_timestep`), not to the
    next timestep of its list: with linspace or trailing spacing the two differ unless T/steps is an integer
    (25 linspace steps: 999 → 959 while the list's next is 957; 7 trailing: 999 → 857, list 856). A schedule
    built from a DDIMScheduler follows that rule for DDIM; one built otherwise steps along the list."""
    unet, scheduler, n = tiny_unet(2), DDIMScheduler(timestep_spacing=spacing), 2
    schedule = NoiseSchedule(scheduler)
    assert schedule.ddim_previous == "stride"
    ours, expected, x_T, bound, kwargs = _ddim_both_ways(unet, scheduler, n, steps, eta, 4)
    assert (ours - expected).abs().max() <= bound < (expected - x_T).abs().max()
    along = NoiseSchedule(scheduler.alphas_cumprod, spacing=spacing, clip_sample=schedule.clip_sample)  # a table
    assert along.ddim_previous == "next"
    listed = biasfast.sample(unet, (n, *SHAPE), along, **kwargs)
    if spacing == "leading":  # T//steps apart: the rules agree
        assert (listed - ours).abs().max() <= bound
    else:
        assert (listed - ours).abs().max() > bound


def _diffusers_dpm_loop(unet, scheduler, x_T, steps):
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_dpm_solver_on_a_clipping_ddpm_schedule_samples_unclipped_as_diffusers(one_thread):
    """DPMSolverMultistepScheduler has no clip_sample: made from a DDPMScheduler's config (which clips by default)
    it samples unclipped, and so does biasfast's dpmsolver++ on the schedule read from that DDPMScheduler. (The
    spacing is set explicitly: from_config passes on only the settings a scheduler was given, not its defaults.)"""
    unet, ddpm, n, steps, seed = tiny_unet(5), DDPMScheduler(timestep_spacing="trailing"), 3, 10, 8
    schedule = NoiseSchedule(ddpm)
    assert schedule.clip_sample == 1.0
    x_T = keyed_normal(seed, range(n), 0, SHAPE, torch.device("cpu"), torch.float32)
    expected = _diffusers_dpm_loop(unet, DPMSolverMultistepScheduler.from_config(ddpm.config), x_T, steps)
    ours = biasfast.sample(unet, (n, *SHAPE), schedule, method="dpmsolver++", steps=steps, seed=seed, progress=False)
    bound = float32_bound(schedule, steps, float(expected.abs().max()))
    assert (ours - expected).abs().max() <= bound < (expected - x_T).abs().max()


@pytest.mark.parametrize("setting", [dict(use_karras_sigmas=True), dict(final_sigmas_type="sigma_min"),
                                     dict(solver_order=3), dict(algorithm_type="sde-dpmsolver++"),
                                     dict(lambda_min_clipped=-5.1), dict(thresholding=True)])
def test_dpm_solver_refuses_scheduler_settings_it_does_not_implement(setting):
    schedule = NoiseSchedule(DPMSolverMultistepScheduler(**setting))
    (key, value), = setting.items()
    with pytest.raises(ValueError, match=rf"schedule: method='dpmsolver\+\+' implements .*; this "
                                         rf"DPMSolverMultistepScheduler sets {re.escape(f'{key}={value!r}')}"):
        biasfast.sample(tiny_unet(), (1, *SHAPE), schedule, method="dpmsolver++", steps=3, progress=False)
    biasfast.sample(tiny_unet(), (1, *SHAPE), schedule, method="ddim", steps=3, progress=False)  # DDIM: no such setting


@pytest.mark.parametrize("config", [dict(), dict(timestep_spacing="leading"),
                                    dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing"),
                                    dict(timestep_spacing="trailing", prediction_type="v_prediction")])
def test_dpm_solver_loop_equals_diffusers_for_each_spacing(config, one_thread):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) with its default linspace
    spacing and with the spacing and offset of its config; biasfast samples the schedule read from it. Before
    biasfast read them it always used linspace: 275 off for leading. Trailing and linspace lists differ by at most
    1 per timestep, so only the v case (values ~1.5; 0.046 off against a bound of 5e-4) tells them apart: a
    random-weight UNet's ε̂ makes x̂0 reach ~450 and the ε bound 0.08 (0.007 off)."""
    unet, scheduler, n, steps, seed = tiny_unet(4), DPMSolverMultistepScheduler(solver_order=2, **config), 3, 10, 6
    assert scheduler.config.algorithm_type == "dpmsolver++"
    schedule = NoiseSchedule(scheduler)
    x_T = keyed_normal(seed, range(n), 0, SHAPE, torch.device("cpu"), torch.float32)
    x = _diffusers_dpm_loop(unet, scheduler, x_T, steps)
    ours = biasfast.sample(unet, (n, *SHAPE), schedule, method="dpmsolver++", steps=steps, seed=seed, progress=False)
    assert (ours - x).abs().max() <= float32_bound(schedule, steps, float(x.abs().max())) < (x - x_T).abs().max()


def test_ddpm_full_loop_equals_diffusers(monkeypatch, one_thread):
    """Every one of T = 200 ancestral steps, with diffusers' default clipping of x̂0 to ±1; diffusers draws its
    noise with `randn_tensor`, which is replaced by biasfast's keyed noise of the same step."""
    from diffusers.schedulers import scheduling_ddpm

    unet, scheduler, n, seed = tiny_unet(1), DDPMScheduler(num_train_timesteps=200), 2, 5
    schedule = NoiseSchedule(scheduler)
    x_T = keyed_normal(seed, range(n), 0, SHAPE, torch.device("cpu"), torch.float32)
    step = {"k": 0}

    def keyed_randn(shape, generator=None, device=None, dtype=None, **_):
        step["k"] += 1
        return keyed_normal(seed, range(n), step["k"], SHAPE, torch.device("cpu"), dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", keyed_randn)
    scheduler.set_timesteps(200)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert step["k"] == 199  # no noise at t = 0
    ours = biasfast.sample(unet, (n, *SHAPE), schedule, method="ddpm", seed=seed, progress=False)
    assert (ours - x).abs().max() <= float32_bound(schedule, 200, float(x.abs().max())) < (x - x_T).abs().max()


def test_class_labels_go_by_keyword_and_coupled_models_work(one_thread):
    unet_a, unet_b = tiny_unet(0, num_class_embeds=3), tiny_unet(1, num_class_embeds=3)
    schedule = NoiseSchedule(DDIMScheduler())
    labels = torch.tensor([0, 2, 1])
    a, b = biasfast.sample_coupled([unet_a, unet_b], 3, SHAPE, schedule, steps=6, class_labels=labels,
                                   progress=False)
    wrapped = biasfast.sample(lambda x, t, c: unet_a(x, t, class_labels=c).sample, (3, *SHAPE), schedule, steps=6,
                              class_labels=labels, progress=False)
    torch.testing.assert_close(a, wrapped, rtol=0, atol=0)
    assert not torch.equal(a, b)
    other = biasfast.sample(unet_a, (3, *SHAPE), schedule, steps=6, class_labels=torch.tensor([1, 1, 1]),
                            progress=False)
    assert not torch.equal(a, other)  # the labels reached the model


def test_denoise_unwraps_outputs():
    x, t = torch.randn(2, *SHAPE), torch.tensor([3, 9])
    unet = tiny_unet()
    with torch.no_grad():
        expected = unet(x, t).sample
        torch.testing.assert_close(denoise(unet, x, t), expected, rtol=0, atol=0)
        torch.testing.assert_close(denoise(lambda x, t: (expected,), x, t), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="model: expected the model to return a tensor"):
        denoise(lambda x, t: {"sample": x}, x, t)


def test_denoiser_agreement_takes_diffusers_models(one_thread):
    unet_a, unet_b = tiny_unet(0), tiny_unet(1)
    schedule = NoiseSchedule(DDPMScheduler())
    train, test = torch.randn(5, *SHAPE), torch.randn(4, *SHAPE)
    direct = denoiser_agreement(unet_a, unet_b, train, test, 100, schedule)
    wrapped = denoiser_agreement(lambda x, t: unet_a(x, t).sample, lambda x, t: unet_b(x, t).sample, train, test,
                                 100, schedule)
    assert direct.train == wrapped.train and direct.test == wrapped.test


class _Unwrapped(torch.nn.Module):
    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def test_trainer_trains_a_diffusers_model_as_a_wrapped_one(one_thread):
    images = torch.rand(6, *SHAPE) * 2 - 1
    schedule = NoiseSchedule(DDPMScheduler())
    config = TrainConfig(batch_size=4, lr=1e-3, weighting="min_snr", seed=3)
    direct = Trainer(tiny_unet(), images, schedule, config)
    wrapped = Trainer(_Unwrapped(tiny_unet()), images, schedule, config)
    losses = [(direct.train_step(), wrapped.train_step()) for _ in range(3)]
    for ours, reference in losses:
        assert ours == pytest.approx(reference, rel=1e-6)
    assert losses[0][0] != losses[2][0]


@pytest.mark.parametrize("prediction,zero_snr", [("epsilon", False), ("v_prediction", False), ("sample", False),
                                                 ("v_prediction", True), ("sample", True)])
def test_min_snr_diffusers_convention_equals_the_training_scripts(prediction, zero_snr):
    """The `--snr_gamma` branch of diffusers' examples/text_to_image/train_text_to_image.py as it has been since
    huggingface/diffusers pull request 6307 (December 2023), transcribed line by line below: the weight is
    min(SNR, γ), divided by SNR for ε and by SNR + 1 for v; any other prediction type keeps min(SNR, γ). It
    multiplies the per-sample MSE before the batch mean. With a zero-terminal-SNR schedule the terminal step's
    v and x0 weight is the scripts' 0 (the ε weight there is the scripts' 0/0, so that case is left out)."""
    scheduler, gamma = DDPMScheduler(prediction_type=prediction, rescale_betas_zero_snr=zero_snr), 5.0
    schedule = NoiseSchedule(scheduler)
    timesteps = torch.cat([torch.randint(0, 1000, (36,)), torch.tensor([999])])
    pred, target = torch.randn(37, 1, 5, 3), torch.randn(37, 1, 5, 3)
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * mse_loss_weights
    assert (snr[-1] == 0) == zero_snr and torch.isfinite(expected).all()
    criterion = SNRWeightedLoss(schedule, "min_snr", prediction, gamma=gamma, convention="diffusers",
                                reduction="none")
    torch.testing.assert_close(criterion(pred, target, timesteps), expected, rtol=1e-5, atol=1e-7)


class _Conditioned(torch.nn.Module):
    """The same UNet behind biasfast's own conditioning convention (`cond.num_classes`, labels positional)."""

    def __init__(self, unet: UNet2DModel, num_classes: int) -> None:
        super().__init__()
        self.unet, self.cond = unet, types.SimpleNamespace(num_classes=num_classes)

    def forward(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels).sample


def test_class_conditional_unet_trains_and_samples_with_labels(one_thread):
    """UNet2DModel(num_class_embeds=4): 3 classes and the null class 3. The Trainer passes labels by keyword and
    drops them to 3 as it does for biasfast's models; sampling with labels uses the class embedding."""
    images, labels = torch.rand(6, *SHAPE) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    schedule = NoiseSchedule(DDPMScheduler())
    config = TrainConfig(batch_size=4, lr=1e-3, label_dropout=0.5, seed=3)
    direct = Trainer(tiny_unet(num_class_embeds=4), images, schedule, config, labels=labels)
    wrapped = Trainer(_Conditioned(tiny_unet(num_class_embeds=4), 3), images, schedule, config, labels=labels)
    assert direct.num_classes == 3
    losses = [(direct.train_step(), wrapped.train_step()) for _ in range(4)]
    for ours, reference in losses:
        assert ours == pytest.approx(reference, rel=1e-6)
    assert losses[0][0] != losses[3][0]
    model = direct.eval_model.eval()
    kwargs = dict(steps=5, seed=1, progress=False)
    per_label = [biasfast.sample(model, (2, *SHAPE), schedule, class_labels=label, **kwargs) for label in (0, 2)]
    by_hand = biasfast.sample(_Conditioned(model, 3), (2, *SHAPE), schedule, class_labels=0, **kwargs)
    torch.testing.assert_close(per_label[0], by_hand, rtol=0, atol=0)
    assert not torch.allclose(per_label[0], per_label[1])  # the label reaches the model
    guided = biasfast.sample(model, (2, *SHAPE), schedule, class_labels=0, guidance_scale=2.0, null_label=3, **kwargs)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, per_label[0])
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\)"):
        Trainer(tiny_unet(num_class_embeds=4), images, schedule, config, labels=labels + 1)
