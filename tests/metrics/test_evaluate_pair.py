"""evaluate_pair is coupled sampling then bias_score, for diffusers models as they are; the example script that
trains two diffusers UNets with it runs end to end on a tiny configuration."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import biasfast  # noqa: E402
from biasfast.diffusion.schedules import NoiseSchedule  # noqa: E402
from biasfast.metrics import evaluate_pair  # noqa: E402
from tests.diffusion.test_diffusers import tiny_unet  # noqa: E402
from tests.metrics.test_features import random_conv_net  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _sets(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(rows, 1, 8, 8, generator=g) * 2 - 1 for rows in (23, 19, 11)]


def test_equals_sampling_then_bias_score(one_thread):
    unet_a, unet_b = tiny_unet(0), tiny_unet(1)
    unet_a.train()
    schedule = NoiseSchedule(diffusers.DDIMScheduler())
    train_a, train_b, test = _sets()
    report = evaluate_pair(unet_a, unet_b, train_a, train_b, schedule, n=7, steps=5, eta=1.0, test=test, seed=3,
                           batch_size=4)
    assert unet_a.training and not unet_b.training  # modes restored
    unet_a.eval()
    a, b = biasfast.sample_coupled([unet_a, unet_b], 7, (1, 8, 8), schedule, steps=5, eta=1.0, seed=3,
                                   batch_size=4, progress=False)  # equal batches: a UNet's rounding follows them
    expected = biasfast.bias_score(a, b, train_a, train_b, test=test)
    assert report.to_dict() == expected.to_dict()


def test_features_and_shape_from_the_model_config(one_thread):
    unet_a, unet_b = tiny_unet(0), tiny_unet(1)
    schedule = NoiseSchedule(diffusers.DDPMScheduler())
    train_a, train_b, _ = _sets(1)
    to_rgb = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), random_conv_net())
    streamed = evaluate_pair(unet_a, unet_b, [train_a[:10], train_a[10:]], iter([train_b]), schedule, n=5, steps=4,
                             features=to_rgb, metric="l2")
    a, b = biasfast.sample_coupled([unet_a, unet_b], 5, (1, 8, 8), schedule, steps=4, progress=False)
    expected = biasfast.bias_score(a, b, train_a, train_b, features=to_rgb, metric="l2")
    torch.testing.assert_close(streamed.own_nn, expected.own_nn, rtol=1e-6, atol=1e-7)
    assert streamed.score == expected.score


def test_errors():
    schedule = NoiseSchedule("linear")
    train_a, train_b, _ = _sets()
    with pytest.raises(TypeError, match="schedule: expected a biasfast.NoiseSchedule"):
        evaluate_pair(tiny_unet(), tiny_unet(), train_a, train_b, "linear", n=2)
    with pytest.raises(ValueError, match="shape: cannot tell the sample shape"):
        evaluate_pair(lambda x, t: x, lambda x, t: x, iter([train_a]), train_b, schedule, n=2)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        evaluate_pair(tiny_unet(), tiny_unet(), train_a, train_b, schedule, n=0)


def test_the_example_trains_two_diffusers_unets_and_tracks_the_bias(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("train_two_unets", ROOT / "examples/train_two_unets.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tracker = example.main(["--steps", "4", "--n-train", "30", "--n-test", "12", "--checkpoints", "2",
                            "--samples", "6", "--sample-steps", "3", "--width", "8", "--batch-size", "8",
                            "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "tracker.json").read_text())
    assert [r["step"] for r in saved["records"]] == [1, 4] == tracker.column("step")
    assert all(r["pair_distance"] > 0 and r["test_loss"] > 0 for r in saved["records"])
    assert (tmp_path / "tracker.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
