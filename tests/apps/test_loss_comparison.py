"""`biasfast run --loss hybrid`: learned-variance models through training, checkpoints, resume and the budgets."""

import json
import os

import pytest
import torch

from biasfast.apps.compare import seed_classifier
from biasfast.apps.main import main
from biasfast.apps.run import Experiment, RunConfig, check_resume_config
from biasfast.data import load_images, split_disjoint
from biasfast.diffusion.sampling import sample_coupled
from biasfast.metrics.quality import classifier_fid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hybrid_comparison_samples_ddpm_with_the_learned_variance(tmp_path, capsys):
    out = str(tmp_path / "cmp")
    argv = ["run", "--quick", "--loss", "hybrid", "--weighting", "constant,debias", "--seeds", "1",
            "--budgets", "ddim10,ddpm20", "--out", out, "--no-progress"]
    assert main(argv) == 0
    with open(os.path.join(out, "comparison.json")) as f:
        table = json.load(f)
    run_dir = os.path.join(out, "debias", "seed_1")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = RunConfig.from_dict(json.load(f))
    assert config.loss == "hybrid" and config.weighting == "debias" and config.variance == "learned_range"
    models = Experiment(config, run_dir, progress=False).final_models()
    x = torch.randn(3, 1, 8, 8)
    assert all(m(x, torch.tensor([0, 1, 999])).shape == (3, 2, 8, 8) for m in models)  # prediction, then v

    # the stored DDPM score is that of learned-variance sampling, not of the fixed variance
    split = split_disjoint(load_images(None), config.n_train, config.n_test, seed=1)
    assert os.path.isfile(os.path.join(out, "classifier_seed1.pt"))
    classifier = seed_classifier(split, out, 1)  # the comparison's cached classifier
    schedule = Experiment(config, run_dir, progress=False).schedule

    def fid(variance):
        samplers = models if variance == "learned_range" else [lambda x, t, m=m: m(x, t)[:, :1] for m in models]
        samples = sample_coupled(samplers, config.n_samples, (1, 8, 8), schedule, seed=1, method="ddpm",
                                 steps=20, variance=variance, progress=False)
        return sum(classifier_fid(classifier, s, split.test) for s in samples) / 2

    stored = table["debias"]["per_seed"]["1"]["fid@ddpm20"]
    assert stored == pytest.approx(fid("learned_range"), rel=1e-6)
    assert stored != pytest.approx(fid("fixed_small"), rel=1e-3)
    assert "paired FID by sampler" in capsys.readouterr().out


def test_the_loss_is_part_of_the_run_identity(tmp_path, capsys):
    out = str(tmp_path / "one")
    assert main(["run", "--quick", "--loss", "hybrid", "--steps", "12", "--out", out, "--no-progress"]) == 0
    assert main(["run", "--resume", out, "--loss", "mse", "--no-progress"]) == 2
    assert "loss: run has 'hybrid', given 'mse'" in capsys.readouterr().err
    assert main(["run", "--resume", out, "--loss", "hybrid", "--no-progress"]) == 0
    assert main(["run", "--quick", "--loss", "vlb", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "loss: unknown 'vlb'" in capsys.readouterr().err


def test_a_config_stored_before_the_loss_existed_resumes_as_mse():
    stored = {k: v for k, v in RunConfig().to_dict().items() if k not in ("loss", "weight_mean")}
    assert RunConfig.from_dict(stored) == RunConfig()
    check_resume_config(stored, {"loss": "mse"})
    with pytest.raises(ValueError, match="loss: run has 'mse', given 'hybrid'"):
        check_resume_config(stored, {"loss": "hybrid"})
