"""Denoisers: shapes for 8..32 px, seeded identical construction, class conditioning with a null class."""

import pytest
import torch

from biasfast.diffusion.models import build_model, drop_labels, timestep_embedding

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("kind", ["unet", "mlp"])
@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 1)])
def test_shapes_and_gradients(kind, size, channels):
    width = {"unet": 8, "mlp": 32}[kind]
    kwargs = {"base_channels": width} if kind == "unet" else {"hidden": width}
    model = build_model(kind, in_channels=channels, image_size=size, **kwargs)
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_out_channels_for_learned_variances(kind):
    kwargs = {"base_channels": 8} if kind == "unet" else {"hidden": 16}
    model = build_model(kind, in_channels=3, image_size=8, out_channels=6, **kwargs)
    assert model(torch.randn(5, 3, 8, 8), torch.arange(5)).shape == (5, 6, 8, 8)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_seeded_construction_is_identical_and_leaves_global_rng(kind):
    state = torch.get_rng_state()
    a, b = build_model(kind, seed=3), build_model(kind, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = build_model(kind, seed=4)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_time_conditioning_changes_output():
    model = build_model("unet", base_channels=8)
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))
    scalar = model(x, torch.tensor(7))
    torch.testing.assert_close(scalar, model(x, torch.tensor([7, 7])))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_class_conditioning_with_null_class(kind):
    model = build_model(kind, num_classes=10)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 300)
    with torch.no_grad():
        model.cond.class_embedding.weight.normal_()  # make every class (and null) distinct
    uncond = model(x, t)
    torch.testing.assert_close(uncond, model(x, t, torch.full((4,), 10)))  # None = the null class 10
    assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2, 3])), uncond)
    with pytest.raises(ValueError, match="class_labels"):
        build_model(kind)(x, t, torch.zeros(4, dtype=torch.long))


def test_drop_labels():
    labels = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(labels, 0.3, 10, g)
    share = (dropped == 10).double().mean().item()
    assert 0.25 < share < 0.35 and torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    with pytest.raises(ValueError, match="label_dropout"):
        drop_labels(labels, 1.5, 10)


def test_embedding_and_bad_arguments():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 7)
    assert emb.shape == (2, 7) and emb[0, :3].eq(1).all()
    with pytest.raises(ValueError, match="unknown kind"):
        build_model("transformer")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", num_classes=0)
    with pytest.raises(ValueError, match="divisible"):
        build_model("unet", image_size=12, channel_mults=(1, 2, 2, 2))
