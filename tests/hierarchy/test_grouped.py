"""The grouped pair: `GroupedDenoiser` computes what its member networks compute, and the pair trainer built on it
trains the two models as two separate `SequenceDenoiser`s with one Adam each would (the previous trainer's loop),
up to float rounding."""

import pytest
import torch

from biasfast._core.seeds import generator_for
from biasfast.hierarchy.denoiser import SequenceDenoiser
from biasfast.hierarchy.grouped import GroupedDenoiser
from biasfast.hierarchy.train import NAMES, PairConfig, PairTrainer, cross_entropy, lr_factor


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small networks: one thread."""


def _networks(groups, q=5, length=8, width=12, layers=2, seed=0):
    torch.manual_seed(seed)
    return [SequenceDenoiser(q, length, width, layers, heads=3) for _ in range(groups)]


@pytest.mark.parametrize("groups,batch", [(1, 7), (2, 13), (3, 5)])
def test_grouped_forward_and_gradients_equal_each_network_in_float64(groups, batch):
    networks = [n.double() for n in _networks(groups)]
    grouped = GroupedDenoiser(networks)
    x_t = torch.randn(groups, batch, 8, 5, dtype=torch.float64)
    t = torch.randint(1, 501, (groups, batch))
    tokens = torch.randint(0, 5, (groups, batch, 8))
    logits = grouped(x_t, t)
    expected = torch.stack([n(x_t[g], t[g]) for g, n in enumerate(networks)])
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    sum(cross_entropy(logits[g], tokens[g]) for g in range(groups)).backward()
    for g, network in enumerate(networks):
        cross_entropy(network(x_t[g], t[g]), tokens[g]).backward()
        for name, p in zip(grouped.names, grouped.stacked):
            torch.testing.assert_close(p.grad[g], dict(network.named_parameters())[name].grad, rtol=1e-10,
                                       atol=1e-12)
        for name, value in grouped.network_state(g).items():
            assert torch.equal(value, network.state_dict()[name])


def test_grouped_rejects_mixed_architectures_and_bad_shapes():
    with pytest.raises(ValueError, match="networks: all networks must have the same architecture"):
        GroupedDenoiser(_networks(1) + [SequenceDenoiser(5, 8, 12, 1, heads=3)])
    with pytest.raises(TypeError, match="networks: expected a non-empty sequence"):
        GroupedDenoiser([])
    with pytest.raises(ValueError, match="networks: only post-norm ReLU"):
        GroupedDenoiser([SequenceDenoiser(5, 8, 12, 1, heads=3, dropout=0.1)])
    grouped = GroupedDenoiser(_networks(2))
    with pytest.raises(ValueError, match=r"x_t: expected shape \(2, batch, 8, 5\)"):
        grouped(torch.randn(3, 4, 8, 5), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t: expected shape \(2, 4\)"):
        grouped(torch.randn(2, 4, 8, 5), torch.ones(2, 3, dtype=torch.long))


def _train_separately(trainer: PairTrainer) -> dict[str, SequenceDenoiser]:
    """The trainer's recipe with one network and one Adam per model, in float32: the reference."""
    config, networks = trainer.config, {}
    for name in NAMES:
        network = config.network(name)
        optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: lr_factor(e, config.epochs, min(config.warmup_epochs, config.epochs)))
        data = trainer.blocks[name]
        for epoch in range(config.epochs):
            generator = generator_for(config.seed, "hierarchy", name, epoch)
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), config.batch_size):
                tokens = data[order[start : start + config.batch_size]]
                t = trainer.diffusion.random_timesteps(len(tokens), generator)
                loss = cross_entropy(network(trainer.diffusion.noise(tokens, t, generator), t), tokens)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()
        networks[name] = network
    return networks


def test_grouped_pair_trains_like_two_separate_models(tmp_path):
    # 3 epochs × 3 batches (the last one short) of Adam at lr 1e-3 on a small grammar; the two sides differ only in
    # float32 summation order (bmm vs mm). One exception: the key bias of attention has gradient exactly 0 in exact
    # arithmetic (a shift of every key by one vector adds a constant to each query's scores, which softmax ignores),
    # so its float gradient is rounding noise that Adam normalises into ±lr steps on either side; it changes no
    # output, so it is compared through the networks' outputs, not weight by weight
    config = PairConfig(q=4, depth=3, q_eff=3, sigma=1.3, data_seed=3, n_train=37, epochs=3, checkpoints=1,
                        first_checkpoint=3, width=16, layers=1, batch_size=16, lr=1e-3, warmup_epochs=2)
    trainer = PairTrainer(config, str(tmp_path))
    trainer.train(progress=False)
    separate = _train_separately(trainer)
    x_t = torch.randn(11, 8, 4)
    t = torch.randint(1, 501, (11,))
    width = config.width
    for name in NAMES:
        grouped = trainer.weights(name, 3)
        moved = 0.0
        for key, value in separate[name].state_dict().items():
            mine = grouped.state_dict()[key]
            if key.endswith("in_proj_bias"):
                mine, value = torch.cat([mine[:width], mine[2 * width:]]), torch.cat([value[:width], value[2 * width:]])
            torch.testing.assert_close(mine, value, rtol=0, atol=2e-5)
            start = config.network(name).state_dict()[key]
            moved = max(moved, float((separate[name].state_dict()[key] - start).abs().max()))
        assert moved > 1e-3  # training moved the weights far beyond the tolerance: the comparison has teeth
        with torch.no_grad():
            torch.testing.assert_close(grouped(x_t, t), separate[name].eval()(x_t, t), rtol=0, atol=2e-5)
