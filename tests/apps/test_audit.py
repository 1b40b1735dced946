"""`biasfast audit` end to end on two saved tiny UNets and PNG folders written here: the report against bias_score
by hand, the pictures, resume after a kill between shards, samples made elsewhere with an embedding, .npz and JPEG
inputs and a folder longer than one stream chunk with the printed summary, the schedule when the folders have no
scheduler/, bad input (mismatched sizes or schedulers among it)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

import biasfast  # noqa: E402
from biasfast.apps import audit  # noqa: E402
from biasfast.apps.main import main  # noqa: E402
from biasfast.data.stream import ImageStream  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on a busy machine
SHAPE = (3, 8, 8)
N = 12


def _unet(seed: int, channels: int = 3, sample_size: int | tuple[int, int] = 8) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def _write_pngs(folder, images: np.ndarray, nested: bool = False) -> None:
    for i, image in enumerate(images):
        path = os.path.join(folder, f"part{i % 2}" if nested else "", f"img{i:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23 + 19 + 9, *SHAPE), dtype=np.uint8)
    paths = {name: str(root / name) for name in ("train_a", "train_b", "test", "model_a", "model_b")}
    _write_pngs(paths["train_a"], images[:23], nested=True)
    _write_pngs(paths["train_b"], images[23:42])
    _write_pngs(paths["test"], images[42:])
    pipeline = paths["model_a"]  # a pipeline folder: unet/ and scheduler/
    _unet(0).save_pretrained(os.path.join(pipeline, "unet"))
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(os.path.join(pipeline, "scheduler"))
    _unet(1).save_pretrained(paths["model_b"])  # a model folder, with the same scheduler beside the model
    diffusers.DDIMScheduler(num_train_timesteps=100).save_pretrained(os.path.join(paths["model_b"], "scheduler"))
    return paths


def _args(inputs, out, *extra):
    return ["audit", "--model-a", inputs["model_a"], "--model-b", inputs["model_b"], "--train-a", inputs["train_a"],
            "--train-b", inputs["train_b"], "--test", inputs["test"], "--n", str(N), "--steps", "4",
            "--shard-size", "5", "--batch-size", "3", "--out", str(out), "--no-progress", *extra]


def _load(out):
    with open(os.path.join(out, "report.json")) as stream:
        return json.load(stream)


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("finished") / "audit"
    assert main(_args(inputs, out)) == 0
    return out


def test_report_equals_bias_score_on_the_saved_samples(inputs, finished, capsys):
    payload = _load(finished)
    shards = sorted(os.listdir(finished / "samples"))
    assert shards == [f"{m}_{i:05d}.npy" for m in "ab" for i in range(3)]
    a, b = (np.concatenate([np.load(finished / "samples" / f"{m}_{i:05d}.npy") for i in range(3)]) for m in "ab")
    train = [ImageStream(inputs[k], k).read_all() for k in ("train_a", "train_b", "test")]
    expected = biasfast.bias_score(a, b, train[0], train[1], test=train[2])
    report = payload["report"]
    assert report["n_samples"] == N and report["score"] == pytest.approx(expected.score, abs=1e-12)
    np.testing.assert_allclose(report["own_nn"], expected.own_nn.numpy(), rtol=1e-5, atol=1e-6)
    assert report["nn_divergence"] == pytest.approx(expected.nn_divergence, rel=1e-4)
    assert "DDIMScheduler" in payload["schedule"]  # read from the pipeline folder
    assert payload["versions"]["diffusers"] == diffusers.__version__
    assert set(payload["timings"]) == {"checks_s", "sampling_s", "search_s", "pictures_s", "total_s"}
    assert not np.allclose(a, b)


def test_gallery_ranks_the_most_copy_like_pairs(finished):
    payload = _load(finished)
    own, cross = (torch.tensor(payload["report"][k]) for k in ("own_nn", "cross_nn"))
    ratio = (own / cross).min(dim=0).values
    assert payload["gallery_pairs"] == ratio.argsort()[:8].tolist()
    with Image.open(finished / "gallery.png") as gallery:
        width, height = gallery.size
    assert (width, height) == (900, int(100 * (1.6 * 8 + 0.4)))
    with Image.open(finished / "distances.png") as histograms:
        assert histograms.size == (770, 440)


def test_resume_after_a_kill_between_shards_gives_the_same_report(inputs, finished, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    real, calls = audit.save_shard, []

    def killed_after_one(*args):
        if calls:
            raise KeyboardInterrupt  # as a SIGINT between shards
        calls.append(1)
        real(*args)

    monkeypatch.setattr(audit, "save_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(_args(inputs, out))
    assert sorted(os.listdir(out / "samples")) == ["a_00000.npy", "b_00000.npy"]
    assert not (out / "report.json").exists()
    monkeypatch.setattr(audit, "save_shard", real)
    assert main(_args(inputs, out)) == 2  # no silent overwrite
    sampled, sample_coupled = [], audit.sample_coupled

    def counted(models, n, *args, first_index, **kwargs):
        sampled.append((first_index, n))
        return sample_coupled(models, n, *args, first_index=first_index, **kwargs)

    monkeypatch.setattr(audit, "sample_coupled", counted)
    assert main(_args(inputs, out, "--resume")) == 0
    assert sampled == [(5, 5), (10, 2)]  # the two missing shards only, not the saved first one
    assert _load(out)["report"] == _load(finished)["report"]


def _samples(out):
    names = sorted(os.listdir(os.path.join(out, "samples")))
    return [np.concatenate([np.load(os.path.join(out, "samples", f)) for f in names if f.startswith(m)]) for m in "ab"]


def test_samples_and_report_do_not_depend_on_the_shard_size(inputs, finished, tmp_path):
    """Noise keyed by the global sample index: one shard of 12 gives the three shards' samples (5, 5, 2), and both
    equal one sample_coupled call with the audit's seed."""
    out = tmp_path / "one_shard"
    args = _args(inputs, out)
    args[args.index("--shard-size") + 1] = str(N)
    assert main(args) == 0
    assert sorted(os.listdir(out / "samples")) == ["a_00000.npy", "b_00000.npy"]
    for whole, sharded in zip(_samples(out), _samples(finished)):
        np.testing.assert_array_equal(whole, sharded)
    assert _load(out)["report"] == _load(finished)["report"]
    models = [audit.load_diffusers_model(inputs[k], k)[0] for k in ("model_a", "model_b")]
    schedule = biasfast.NoiseSchedule(diffusers.DDIMScheduler(num_train_timesteps=100))
    # at the audit's --batch-size: the noise is keyed by sample, but a UNet's float32 rounding may depend on the
    # batch it sees (oneDNN picks its convolution kernels by shape: 1 ulp between batches of 12 and 3 on an AMD EPYC)
    direct = biasfast.sample_coupled(models, N, SHAPE, schedule, seed=0, steps=4, method="ddim", eta=1.0,
                                     batch_size=3, progress=False)
    for made, sharded in zip(direct, _samples(finished)):
        np.testing.assert_array_equal(made.numpy(), sharded)


def test_dpm_solver_audit_equals_its_sampler(inputs, tmp_path):
    """--method dpmsolver++ (eta 0 by default): the audit's samples are DPM-Solver++(2M)'s from the pipeline's
    scheduler (that loop is checked against diffusers' DPMSolverMultistepScheduler in tests/diffusion)."""
    out = tmp_path / "dpm"
    assert main(_args(inputs, out, "--method", "dpmsolver++")) == 0
    payload = _load(out)
    assert payload["config"]["method"] == "dpmsolver++" and payload["config"]["eta"] == 0.0
    models = [audit.load_diffusers_model(inputs[k], k)[0] for k in ("model_a", "model_b")]
    schedule = biasfast.NoiseSchedule(diffusers.DDIMScheduler(num_train_timesteps=100))
    direct = biasfast.sample_coupled(models, N, SHAPE, schedule, seed=0, steps=4, method="dpmsolver++",
                                     batch_size=3, progress=False)  # the audit's --batch-size, as above
    for made, saved in zip(direct, _samples(out)):
        np.testing.assert_array_equal(made.numpy(), saved)
    ddim = biasfast.sample_coupled(models, N, SHAPE, schedule, seed=0, steps=4, method="ddim", progress=False)
    assert not np.allclose(ddim[0].numpy(), _samples(out)[0])  # another sampler, not the DDIM default
    assert payload["report"]["n_samples"] == N


def test_schedule_flag_for_folders_without_a_scheduler(inputs, tmp_path):
    """Two model folders without scheduler/: both are sampled on --schedule's named schedule."""
    for seed, side in enumerate("ab"):
        _unet(seed).save_pretrained(tmp_path / f"bare_{side}")
    out = tmp_path / "cosine"
    args = _args(inputs, out, "--schedule", "cosine")
    for side in "ab":
        args[args.index(f"--model-{side}") + 1] = str(tmp_path / f"bare_{side}")
    assert main(args) == 0
    assert _load(out)["schedule"].startswith("NoiseSchedule('cosine', num_timesteps=1000")
    models = [audit.load_diffusers_model(str(tmp_path / f"bare_{side}"), side)[0] for side in "ab"]
    direct = biasfast.sample_coupled(models, N, SHAPE, biasfast.NoiseSchedule("cosine"), seed=0, steps=4,
                                     method="ddim", eta=1.0, batch_size=3, progress=False)
    for made, saved in zip(direct, _samples(out)):
        np.testing.assert_array_equal(made.numpy(), saved)


class TinyEmbedding(torch.nn.Module):
    """A fixed random conv embedding for --features (built with no arguments)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())

    def forward(self, x):
        return self.net(x)


def test_samples_made_elsewhere_memmaps_and_features(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {name: rng.uniform(-1, 1, (rows, *SHAPE)).astype(np.float32)
              for name, rows in (("sa", 7), ("sb", 7), ("ta", 30), ("tb", 31))}
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    out = tmp_path / "out"
    code = main(["audit", "--samples-a", str(tmp_path / "sa.npy"), "--samples-b", str(tmp_path / "sb.npy"),
                 "--train-a", str(tmp_path / "ta.npy"), "--train-b", str(tmp_path / "tb.npy"), "--metric", "l2",
                 "--features", "tests.apps.test_audit:TinyEmbedding", "--out", str(out), "--no-progress"])
    assert code == 0
    expected = biasfast.bias_score(arrays["sa"], arrays["sb"], arrays["ta"], arrays["tb"], metric="l2",
                                   features=TinyEmbedding())
    np.testing.assert_allclose(_load(out)["report"]["own_nn"], expected.own_nn.numpy(), rtol=1e-5, atol=1e-6)


def test_npz_jpeg_and_a_folder_longer_than_one_chunk(tmp_path, capsys):
    """Every input kind through the audit's image stream: --train-a a PNG folder of 1100 images (more than one
    1024-row chunk; the A samples are copies of images 1030.., in the second chunk), --train-b and --samples-b
    .npz files (uint8 and float), --samples-a a JPEG folder. The report and its printed summary equal
    bias_score's on the same pixels decoded here."""
    rng = np.random.default_rng(2)
    train_a = rng.integers(0, 256, (1100, 8, 8, 3), dtype=np.uint8)  # (N, H, W, C), as the PNGs hold them
    train_b = rng.integers(0, 256, (40, *SHAPE), dtype=np.uint8)
    samples_b = rng.uniform(-1, 1, (6, *SHAPE)).astype(np.float32)
    for i, image in enumerate(train_a):
        path = tmp_path / "train_a" / f"img{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
    (tmp_path / "samples_a").mkdir()
    for i, image in enumerate(train_a[1030:1036]):
        Image.fromarray(image).save(tmp_path / "samples_a" / f"s{i}.jpg", quality=95, subsampling=0)
    np.savez(tmp_path / "train_b.npz", images=train_b)
    np.savez(tmp_path / "samples_b.npz", samples=samples_b)
    out = tmp_path / "out"
    code = main(["audit", "--samples-a", str(tmp_path / "samples_a"), "--samples-b", str(tmp_path / "samples_b.npz"),
                 "--train-a", str(tmp_path / "train_a"), "--train-b", str(tmp_path / "train_b.npz"),
                 "--out", str(out), "--no-progress"])
    assert code == 0

    def pixels(array):  # uint8 (N, H, W, C) → float32 (N, C, H, W) in [−1, 1]
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1

    jpegs = sorted((tmp_path / "samples_a").iterdir())
    decoded = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in jpegs])
    expected = biasfast.bias_score(pixels(decoded), samples_b, pixels(train_a),
                                   train_b.astype(np.float32) / 127.5 - 1)
    report = _load(out)["report"]
    np.testing.assert_allclose(report["own_nn"], expected.own_nn.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(report["cross_nn"], expected.cross_nn.numpy(), rtol=1e-5, atol=1e-6)
    assert max(report["own_nn"][0]) < 0.01 < min(report["cross_nn"][0])  # found in the second chunk
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == expected.summary().splitlines()
    assert printed[-1].startswith(f"audit: {out / 'report.json'}, gallery.png, distances.png (")


def _bad_inputs(inputs, tmp_path):
    """(name, arguments, expected message) for every bad input the audit must refuse."""
    empty, garbage, mixed, overlap, nomodel = (tmp_path / n for n in ("empty", "garbage", "mixed", "overlap", "nomodel"))
    empty.mkdir()
    nomodel.mkdir()
    shutil.copytree(inputs["train_b"], garbage)
    (garbage / "broken.png").write_bytes(b"not a png")
    shutil.copytree(inputs["train_b"], mixed)
    Image.new("RGB", (9, 8)).save(mixed / "zz_wide.png")
    shutil.copytree(inputs["train_b"], overlap)
    for name in ("img000.png", "img002.png"):
        shutil.copy(os.path.join(inputs["train_a"], "part0", name), overlap / f"copy_{name}")
    grey, larger = tmp_path / "grey_model", tmp_path / "larger_model"
    _unet(2, channels=1).save_pretrained(grey)
    _unet(2, sample_size=(16, 8)).save_pretrained(larger)  # runs on 8×8 images all the same
    v_model, bare = tmp_path / "v_model", tmp_path / "bare_model"
    for folder in (v_model, bare):
        _unet(1).save_pretrained(folder)
    v_scheduler = diffusers.DDIMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    v_scheduler.save_pretrained(v_model / "scheduler")
    model_a = inputs["model_a"]

    def swap(flag, value):
        args = _args(inputs, tmp_path / f"out_{flag}_{os.path.basename(str(value))}")
        args[args.index(flag) + 1] = str(value)
        return args

    return [
        ("no model", swap("--model-b", nomodel), "holds no diffusers model"),
        ("wrong shape", swap("--model-b", grey), "--model-b: the model"),
        ("sample size", swap("--model-b", larger), f"--model-b: the model in '{larger}' has sample_size 16×8 "
                                                    "(height×width), but the training images are 8×8"),
        ("schedulers", swap("--model-b", v_model),
         f"the schedules of --model-a '{model_a}' (its scheduler/) and --model-b '{v_model}' (its scheduler/) "
         "differ in prediction_type ('epsilon' vs 'v_prediction')"),
        ("no scheduler", swap("--model-b", bare),
         f"and --model-b '{bare}' (no scheduler/, so --schedule linear) differ in alphas_cumprod (100 vs 1000 "
         "timesteps), timestep_spacing ('leading' vs None), clip_sample (1.0 vs None)"),
        ("mixed sizes", swap("--train-b", mixed), "images of mixed sizes: '" + str(mixed / "zz_wide.png")),
        ("unreadable", swap("--train-b", garbage), "cannot read image '" + str(garbage / "broken.png")),
        ("empty", swap("--train-b", empty), "holds no PNG or JPEG images"),
        ("overlap", swap("--train-b", overlap), "overlap: 2 image(s)"),
        ("missing", swap("--test", tmp_path / "nowhere"), "--test: "),
        ("dpm eta", _args(inputs, tmp_path / "dpm_eta", "--method", "dpmsolver++", "--eta", "1"),
         "--eta: DPM-Solver++ is deterministic"),
        ("method", _args(inputs, tmp_path / "heun", "--method", "heun"), "--method: unknown 'heun'"),
        ("both", _args(inputs, tmp_path / "both", "--samples-a", "x.npy"), "pass exactly one of them"),
        ("resume nothing", _args(inputs, tmp_path / "fresh", "--resume"), "holds no audit to continue"),
    ]


def test_bad_input_gives_a_clear_error_and_writes_nothing(inputs, tmp_path, capsys):
    for name, args, message in _bad_inputs(inputs, tmp_path):
        assert main(args) == 2, name
        error = capsys.readouterr().err
        assert message in error, (name, error)
        out = args[args.index("--out") + 1]
        assert not os.path.exists(os.path.join(out, "report.json")), name
        assert not os.path.exists(os.path.join(out, "samples")), name


class _Planted:
    """A pickled object whose loading would create a file: weights_only loading must refuse it unrun."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_model_weights_load_through_safetensors_or_weights_only(tmp_path):
    # .bin weights (save_pretrained without safetensors) load as the safetensors ones do
    _unet(3).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "bin")) == ["config.json", "diffusion_pytorch_model.bin"]
    model, scheduler = audit.load_diffusers_model(str(tmp_path / "bin"), "--model-a")
    expected = _unet(3).state_dict()
    assert scheduler is None and all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # a .bin that holds a pickled object is refused before it runs (torch.load(weights_only=True))
    planted, marker = tmp_path / "planted", tmp_path / "ran"
    shutil.copytree(tmp_path / "bin", planted)
    torch.save({"weight": _Planted(str(marker))}, planted / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"--model-a: cannot load the weights in .*planted/diffusion_pytorch_model"):
        audit.load_diffusers_model(str(planted), "--model-a")
    assert not marker.exists()
    # a torn safetensors file names the file
    torn = tmp_path / "torn"
    _unet(3).save_pretrained(torn)
    weights = torn / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"--model-b: cannot load the weights in .*torn/diffusion_pytorch_model"):
        audit.load_diffusers_model(str(torn), "--model-b")
