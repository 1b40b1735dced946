"""Trainer: counter-based randomness, exact resume from a checkpoint, EMA, the fixed-noise test loss."""


import pytest
import torch

import biasfast
from biasfast.diffusion.models import build_model
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast._core.io import load_checkpoint, save_atomic
from biasfast._core.seeds import generator_for
from biasfast.ops import reference
from biasfast.diffusion.training import (DenoisingEval, TrainConfig, Trainer, diffusion_target, ema_decay_at,
                                        log_spaced_steps)


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULE = NoiseSchedule("linear", 1000)


def _images(n=37, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _trainer(images=None, **config):
    config = {"batch_size": 16, "lr": 1e-3, "seed": 1, **config}
    model = build_model("mlp", hidden=32, seed=0)
    return Trainer(model, _images() if images is None else images, SCHEDULE, TrainConfig(**config))


def test_batches_are_epoch_permutations_wrapping_across_epochs():
    trainer = _trainer()
    order = torch.cat([trainer._batch_indices(s) for s in range(7)])  # 112 positions over 37 images
    for epoch in range(3):
        assert sorted(order[epoch * 37:(epoch + 1) * 37].tolist()) == list(range(37))
    assert not torch.equal(order[:37], order[37:74])
    fresh = _trainer()
    assert torch.equal(fresh._batch_indices(5), trainer._batch_indices(5))  # depends on the step only


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, ema):
    straight = _trainer(ema_decay=ema)
    losses = [straight.train_step() for _ in range(9)]
    first = _trainer(ema_decay=ema)
    for _ in range(4):
        first.train_step()
    save_atomic(first.state_dict(), str(tmp_path / "ckpt.pt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    resumed = _trainer(ema_decay=ema)
    resumed.load_state_dict(load_checkpoint(str(tmp_path / "ckpt.pt")))
    resumed_losses = [resumed.train_step() for _ in range(5)]
    assert resumed_losses == losses[4:]
    for a, b in zip(straight.eval_model.state_dict().values(), resumed.eval_model.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.step == 9


def test_ema_tracks_the_weights():
    trainer = _trainer(ema_decay=0.75)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    for e, p, b in zip(trainer.ema.parameters(), trainer.model.parameters(), before):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * p)
    assert trainer.eval_model is trainer.ema


def test_ema_warmup_equals_diffusers_ema_model():
    """With ema_warmup the EMA weights follow diffusers' EMAModel (its default (1 + k)/(10 + k) warm-up) step for
    step; without it they keep ~decay^k of the initial weights."""
    training_utils = pytest.importorskip("diffusers.training_utils")
    trainer = _trainer(ema_decay=0.99, ema_warmup=True)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    ema = training_utils.EMAModel(trainer.model.parameters(), decay=0.99)
    for _ in range(12):
        trainer.train_step()
        ema.step(trainer.model.parameters())
    for ours, theirs in zip(trainer.ema.parameters(), ema.shadow_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    plain = _trainer(ema_decay=0.99)
    for _ in range(12):
        plain.train_step()
    gap = max(float((a - b).abs().max()) for a, b in zip(plain.ema.parameters(), trainer.ema.parameters()))
    drift = max(float((p.detach() - i).abs().max()) for p, i in zip(trainer.model.parameters(), initial))
    assert gap > 0.5 * drift  # the plain EMA is still near the initial weights


def test_ema_decay_at_follows_the_warmup_rule():
    assert [ema_decay_at(k, 0.9, True) for k in range(4)] == [0.0, 2 / 11, 3 / 12, 4 / 13]
    assert ema_decay_at(10**6, 0.9, True) == 0.9 and ema_decay_at(0, 0.9, False) == 0.9
    with pytest.raises(ValueError, match="ema_warmup: needs ema_decay"):
        TrainConfig(ema_warmup=True)


def test_training_step_uses_the_weighted_loss():
    """The first step's loss equals the SNR-weighted ε-MSE recomputed by hand from the same randomness."""
    for name in ("constant", "debias"):
        trainer = _trainer(weighting=name)
        model_copy = build_model("mlp", hidden=32, seed=0)
        index = trainer._batch_indices(0)
        g = generator_for(1, "step", 0)
        t = torch.randint(0, 1000, (16,), generator=g)
        noise = torch.randn(16, 1, 8, 8, generator=g)
        x0 = trainer.images[index]
        ab = SCHEDULE.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        pred = model_copy(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t)
        weights = biasfast.weighting(name, SCHEDULE, "epsilon").float()
        expected = (weights[t] * (pred - noise).square().flatten(1).mean(1)).mean()
        assert trainer.train_step() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["constant", "debias"])
def test_hybrid_training_step_is_the_float64_hybrid_loss(name):
    """loss="hybrid": the first step's loss and the output layer's gradient equal guided-diffusion's hybrid loss
    (float64 transcription, on the float32 model's output) for a 2C-channel model from the same randomness. The rows of the variance channels
    get a gradient (from L_vlb alone), which a trainer that fell back to the MSE would leave at zero."""
    trainer = Trainer(build_model("mlp", hidden=32, seed=0, out_channels=2), _images(), SCHEDULE,
                      TrainConfig(batch_size=13, lr=1e-3, seed=1, weighting=name, loss="hybrid"))
    model_copy = build_model("mlp", hidden=32, seed=0, out_channels=2)
    g = generator_for(1, "step", 0)
    t = torch.randint(0, 1000, (13,), generator=g)
    noise = torch.randn(13, 1, 8, 8, generator=g).double()
    x0 = trainer.images[trainer._batch_indices(0)].double()
    ab = SCHEDULE.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    output = model_copy((ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float(), t).double()
    expected, _, vb = reference.hybrid_loss(output, x0, noise, t, SCHEDULE.alphas_cumprod.double(),
                                            biasfast.weighting(name, SCHEDULE), return_terms=True)
    expected.backward()
    assert trainer.train_step() == pytest.approx(expected.item(), rel=1e-5)
    assert vb.abs().min() > 0
    grad, grad64 = trainer.model.out.weight.grad, model_copy.out.weight.grad
    variance_rows = slice(64, 128)  # output features 64..127: the v channel of the 8×8 image
    for rows in (slice(0, 64), variance_rows):  # each on its own scale: the vb gradient is ~1e-4 of the MSE's
        assert grad64[rows].abs().max() > 0
        torch.testing.assert_close(grad[rows], grad64[rows], rtol=1e-4, atol=1e-6 * grad64[rows].abs().max().item())


def test_hybrid_loss_needs_a_supported_prediction():
    with pytest.raises(ValueError, match="prediction"):
        Trainer(build_model("mlp", hidden=8, out_channels=2), _images(), SCHEDULE,
                TrainConfig(loss="hybrid", prediction="v_prediction"))
    with pytest.raises(ValueError, match="loss: unknown 'vlb'"):
        TrainConfig(loss="vlb")


def test_denoising_eval_of_a_learned_variance_model_scores_the_prediction_channels():
    model = build_model("mlp", hidden=16, seed=0)

    class WithVariance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, t):
            return torch.cat([self.inner(x, t), torch.full_like(x, 7.0)], dim=1)

    with_variance = WithVariance()
    expected = DenoisingEval(_images(11), SCHEDULE, bins=3)(model)
    assert DenoisingEval(_images(11), SCHEDULE, bins=3, learned_variance=True)(with_variance) == expected


def test_training_lowers_the_test_loss():
    from biasfast.data import load_digits, split_disjoint

    split = split_disjoint(load_digits(), 200, 100, seed=0)
    model = build_model("mlp", hidden=128, seed=0)
    trainer = Trainer(model, split.train_a, SCHEDULE, TrainConfig(batch_size=64, lr=3e-3))
    evaluate = DenoisingEval(split.test, SCHEDULE, bins=5, seed=0)
    before, _ = evaluate(trainer.model)
    for _ in range(100):
        trainer.train_step()
    after, bins = evaluate(trainer.model)
    assert after < 0.7 * before and bins[0] > bins[-1]  # ε is hardest to predict at low noise


def test_denoising_eval_is_fixed_and_stratified():
    evaluate = DenoisingEval(_images(11), SCHEDULE, bins=4, seed=2)
    model = build_model("mlp", hidden=16, seed=0)
    loss, bins = evaluate(model)
    assert (loss, bins) == evaluate(model) and len(bins) == 4
    assert loss == pytest.approx(sum(bins) / 4)
    k = torch.arange(44) % 4
    assert ((evaluate.t >= k * 250) & (evaluate.t < (k + 1) * 250)).all()
    model.train()
    evaluate(model)
    assert model.training  # restored


def test_denoising_eval_with_labels_calls_the_conditional_branch():
    model = build_model("unet", base_channels=8, num_classes=3, seed=0)
    labels = torch.arange(11) % 3
    conditional, _ = DenoisingEval(_images(11), SCHEDULE, bins=3, labels=labels)(model)
    unconditional, _ = DenoisingEval(_images(11), SCHEDULE, bins=3)(model)
    null, _ = DenoisingEval(_images(11), SCHEDULE, bins=3, labels=torch.full((11,), 3))(model)  # 3: null class
    assert null == pytest.approx(unconditional, rel=1e-12) and conditional != pytest.approx(unconditional, rel=1e-3)
    with pytest.raises(ValueError, match="labels: expected shape"):
        DenoisingEval(_images(11), SCHEDULE, labels=labels[:5])


def test_v_and_sample_targets():
    x0, eps, ab = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.full((3, 1, 1, 1), 0.36)
    torch.testing.assert_close(diffusion_target(x0, eps, ab, "v_prediction"), 0.6 * eps - 0.8 * x0)
    assert diffusion_target(x0, eps, ab, "sample") is x0


def test_class_conditional_training_with_label_dropout():
    """The first step's loss is the ε-MSE of the model given the batch's labels, each replaced by the null class
    with the dropout probability, all drawn from the step's generator; other labels give another loss."""
    from biasfast.diffusion.models import drop_labels

    labels = torch.arange(37) % 3

    def first_loss(labels, dropout):
        model = build_model("unet", base_channels=8, num_classes=3, seed=0)
        trainer = Trainer(model, _images(), SCHEDULE, TrainConfig(batch_size=8, label_dropout=dropout, seed=1),
                          labels=labels)
        return trainer, trainer.train_step()

    trainer, loss = first_loss(labels, 0.2)
    g = generator_for(1, "step", 0)
    index = trainer._batch_indices(0)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(8, 1, 8, 8, generator=g)
    dropped = drop_labels(labels[index], 0.2, 3, g)
    ab = SCHEDULE.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    model = build_model("unet", base_channels=8, num_classes=3, seed=0).train()
    pred = model(ab.sqrt() * _images()[index] + (1 - ab).sqrt() * noise, t, dropped)
    assert loss == pytest.approx((pred - noise).square().mean().item(), rel=1e-5)
    assert (dropped == 3).any() and (dropped != 3).any()  # this batch drops some labels and keeps others
    assert loss != pytest.approx(first_loss(labels, 0.0)[1], rel=1e-6)  # so the dropout changed what the model saw
    rate = (drop_labels(torch.zeros(20000, dtype=torch.long), 0.2, 3, torch.Generator().manual_seed(0)) == 3)
    assert abs(rate.double().mean().item() - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5  # the probability, within 4 SE
    assert first_loss((labels + 1) % 3, 0.0)[1] != pytest.approx(first_loss(labels, 0.0)[1], rel=1e-6)
    assert torch.equal(drop_labels(labels, 1.0, 3), torch.full_like(labels, 3))  # p = 1: all null
    assert torch.equal(drop_labels(labels, 0.0, 3), labels)
    with pytest.raises(ValueError, match="num_classes"):
        Trainer(build_model("mlp", hidden=8), _images(), SCHEDULE, TrainConfig(), labels=labels)


def test_log_spaced_steps():
    steps = log_spaced_steps(3000, 10, 30)
    assert steps[0] == 30 and steps[-1] == 3000 and steps == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert max(ratios) / min(ratios) < 1.1
    assert log_spaced_steps(5, 10) == [1, 2, 3, 4, 5]


def test_bad_configuration():
    with pytest.raises(ValueError, match="weighting"):
        _trainer(weighting="no_such_weighting")
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="score")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="images"):
        Trainer(build_model("mlp"), torch.zeros(3, 64), SCHEDULE, TrainConfig())
    trainer = _trainer(ema_decay=0.9)
    state = trainer.state_dict()
    with pytest.raises(ValueError, match="EMA"):
        _trainer().load_state_dict(state)
