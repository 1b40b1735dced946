"""`biasfast audit`: two trained checkpoints (or their samples) against their two training sets, in one command.

Models come from diffusers folders (`UNet2DModel.save_pretrained`, or a pipeline folder with unet/ and scheduler/),
their weights read through safetensors or `torch.load(weights_only=True)` only. Every input is checked before
anything is sampled. Samples are written in shards as they are made, so `--resume` continues a killed audit
without redoing them; report.json is written last and atomically, so its presence means the audit finished.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from biasfast._core.checks import check_device
from biasfast._core.constants import METRICS
from biasfast._core.io import write_atomically, write_json_atomic
from biasfast._core.memory import fix_mmap_threshold
from biasfast.data.stream import ImageStream
from biasfast.diffusion.models import denoise
from biasfast.diffusion.sampling import DPM_SOLVER, LOOP_METHODS, sample_coupled
from biasfast.diffusion.schedules import NAMED_SCHEDULES, NoiseSchedule
from biasfast.metrics.bias import BiasReport, bias_score
from biasfast.metrics.features import Embedding
from biasfast.neighbors.knn import knn
from biasfast.ops.row_hash import row_hash

CONFIG_FILE, REPORT_FILE, SAMPLE_DIR = "audit.json", "report.json", "samples"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GALLERY_ROWS = 8
# NoiseSchedule settings that change the samples, with the scheduler config keys they come from
SCHEDULE_FIELDS = {"prediction": "prediction_type", "spacing": "timestep_spacing", "steps_offset": "steps_offset",
                   "clip_sample": "clip_sample", "set_alpha_to_one": "set_alpha_to_one"}


@dataclass
class AuditConfig:
    """What determines the audit's numbers; a resumed audit must match it."""

    model_a: str | None
    model_b: str | None
    samples_a: str | None
    samples_b: str | None
    train_a: str
    train_b: str
    test: str | None
    n: int
    steps: int
    method: str
    eta: float
    metric: str
    seed: int
    shard_size: int
    schedule: str
    features: str | None


# ---- inputs ----------------------------------------------------------------------------------------------------


def load_diffusers_model(folder: str, name: str) -> tuple[torch.nn.Module, Any]:
    """(model, scheduler or None) from a model folder or a pipeline folder with unet/ (and scheduler/)."""
    import diffusers

    if not os.path.isdir(folder):
        raise ValueError(f"{name}: {folder!r} is not a folder (expected a diffusers model or pipeline folder)")
    model_dir = os.path.join(folder, "unet") if os.path.isdir(os.path.join(folder, "unet")) else folder
    config_path = os.path.join(model_dir, "config.json")
    weights = [os.path.join(model_dir, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if not os.path.isfile(config_path) or not weights:
        raise ValueError(f"{name}: {folder!r} holds no diffusers model (need config.json and {WEIGHT_FILES[0]} "
                         f"or {WEIGHT_FILES[1]}, in the folder or in its unet/)")
    config = _read_json(config_path, name)
    kind = getattr(diffusers, str(config.get("_class_name", "UNet2DModel")), None)
    if not (isinstance(kind, type) and issubclass(kind, diffusers.ModelMixin)):
        raise ValueError(f"{name}: {config_path!r} names {config.get('_class_name')!r}, not a diffusers model class")
    model = kind.from_config(config)
    try:
        if weights[0].endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights[0])
        else:
            state = torch.load(weights[0], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a torn or foreign file: say which one
        raise ValueError(f"{name}: cannot load the weights in {weights[0]!r}: {exc}") from None
    scheduler = None
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_config):
        settings = _read_json(scheduler_config, name)
        kind = getattr(diffusers, str(settings.get("_class_name")), None)
        if not isinstance(kind, type) or not hasattr(kind, "from_config"):
            raise ValueError(f"{name}: {scheduler_config!r} names an unknown scheduler {settings.get('_class_name')!r}")
        scheduler = kind.from_config(settings)
    return model.eval(), scheduler


def _read_json(path: str, name: str) -> dict:
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {path!r}: {exc}") from None


def check_model_shape(model: torch.nn.Module, shape: tuple[int, ...], name: str, device: torch.device) -> None:
    """One forward pass at t = 0 on a zero image of the training images' shape."""
    x = torch.zeros((1, *shape), device=device)
    try:
        with torch.no_grad():
            out = denoise(model, x, torch.zeros(1, dtype=torch.long, device=device), name=name)
    except Exception as exc:
        raise ValueError(f"{name}: the model does not take images of the training sets' shape {shape}: {exc}") from None
    if out.shape != x.shape:
        raise ValueError(f"{name}: the model maps images of shape {shape} to {tuple(out.shape[1:])}; it was not "
                         f"trained on images like the training sets'")


def check_sample_size(model: torch.nn.Module, shape: tuple[int, ...], name: str, folder: str) -> None:
    """A model's config `sample_size` (int or (height, width)) must be the images' size: a convolutional UNet
    runs on other sizes too, so the forward pass of `check_model_shape` would not notice."""
    size = getattr(model, "config", {}).get("sample_size")
    if size is None:
        return
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if (height, width) != tuple(shape[1:]):
        raise ValueError(f"{name}: the model in {folder!r} has sample_size {height}×{width} (height×width), but "
                         f"the training images are {shape[1]}×{shape[2]}; it was not trained on images like these")


def _schedule_differences(a: NoiseSchedule, b: NoiseSchedule) -> list[str]:
    """What differs between two schedules in a way that changes the samples, under diffusers' config names."""
    differences = []
    if a.num_timesteps != b.num_timesteps:
        differences.append(f"alphas_cumprod ({a.num_timesteps} vs {b.num_timesteps} timesteps)")
    elif not torch.allclose(a.alphas_cumprod, b.alphas_cumprod, rtol=1e-6, atol=0):
        differences.append("alphas_cumprod")
    for field, key in SCHEDULE_FIELDS.items():
        if getattr(a, field) != getattr(b, field):
            differences.append(f"{key} ({getattr(a, field)!r} vs {getattr(b, field)!r})")
    return differences


def agreed_schedule(schedulers: dict[str, tuple[str, Any]], fallback: str) -> NoiseSchedule:
    """The one schedule both models are sampled with: each folder's scheduler/, or the named `fallback` (the
    --schedule flag) for a folder without one. `schedulers` maps a flag to (folder, scheduler or None); if the
    two schedules differ in anything that changes the samples, that is an error naming both folders."""
    schedules, sources = [], []
    for flag, (folder, scheduler) in schedulers.items():
        schedules.append(NoiseSchedule(scheduler) if scheduler is not None else NoiseSchedule(fallback))
        source = "its scheduler/" if scheduler is not None else f"no scheduler/, so --schedule {fallback}"
        sources.append(f"{flag} {folder!r} ({source})")
    differences = _schedule_differences(*schedules)
    if differences:
        raise ValueError(f"--model-a/--model-b: the schedules of {sources[0]} and {sources[1]} differ in "
                         f"{', '.join(differences)}; the audit samples both models with one schedule, so give "
                         f"both folders the same scheduler/")
    return schedules[0]


def check_disjoint(train_a: ImageStream, train_b: ImageStream) -> None:
    """A and B must not share an image: count the rows of B identical to a row of A."""
    hashes_a = torch.cat([row_hash(chunk.flatten(1)) for chunk in train_a.chunks()])
    shared = sum(int(torch.isin(row_hash(chunk.flatten(1)), hashes_a).sum()) for chunk in train_b.chunks())
    if shared:
        raise ValueError(f"--train-a and --train-b overlap: {shared} image(s) of {train_b.path!r} also appear in "
                         f"{train_a.path!r}; the audit assumes disjoint training sets")


def load_features(spec: str | None) -> Callable | None:
    """`module:attribute` naming an embedding: a module or callable mapping images to (n, d) rows, or a module
    class built with no arguments."""
    if spec is None:
        return None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--features: expected module:attribute (e.g. mypkg.embed:model), got {spec!r}")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--features: cannot import {spec!r}: {exc}") from None
    if isinstance(value, type):  # a module class: built with its defaults
        value = value()
    if not callable(value):
        raise ValueError(f"--features: {spec!r} is not callable")
    return value


# ---- sampling in shards ----------------------------------------------------------------------------------------


def _shard_path(out: str, model: str, index: int) -> str:
    return os.path.join(out, SAMPLE_DIR, f"{model}_{index:05d}.npy")


def save_shard(out: str, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """B after A: a shard counts as done only when both files exist."""
    for model, samples in (("a", a), ("b", b)):
        array = samples.detach().cpu().numpy()
        write_atomically(_shard_path(out, model, index), lambda stream, array=array: np.save(stream, array), "wb")


def sample_shards(models, schedule: NoiseSchedule, shape, config: AuditConfig, out: str, device: torch.device,
                  batch_size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All n sample pairs, shard by shard; sample j's noise is keyed by (seed, j), its global index, so the
    samples equal one `sample_coupled(models, n, seed=seed)` call whatever the shard and batch sizes, and a
    resumed audit redoes nothing and makes exactly the samples an uninterrupted one would."""
    shards = range(0, config.n, config.shard_size)
    bar = tqdm(total=config.n, desc="sampling A and B", unit="pair", disable=not progress)
    for index, start in enumerate(shards):
        size = min(config.shard_size, config.n - start)
        if not os.path.isfile(_shard_path(out, "b", index)):
            a, b = sample_coupled(models, size, shape, schedule, seed=config.seed, first_index=start,
                                  steps=config.steps, method=config.method, eta=config.eta, batch_size=batch_size,
                                  device=device, progress=False)
            save_shard(out, index, a, b)
        bar.update(size)
    bar.close()
    return tuple(torch.cat([torch.from_numpy(np.load(_shard_path(out, m, i))) for i in range(len(shards))])
                 for m in ("a", "b"))


def read_samples(path: str, name: str, shape) -> torch.Tensor:
    samples = ImageStream(path, name)
    if tuple(samples.shape) != tuple(shape):
        raise ValueError(f"{name}: samples of shape {samples.shape}, but the training images are {tuple(shape)}")
    return samples.read_all()


# ---- pictures --------------------------------------------------------------------------------------------------


def _streamed(stream: ImageStream, desc: str, progress: bool, embedding: Embedding | None):
    bar = tqdm(total=len(stream), desc=desc, unit="image", disable=not progress, leave=False)
    for chunk in stream.chunks():
        bar.update(chunk.shape[0])
        yield chunk if embedding is None else embedding(chunk, desc)
    bar.close()


def nearest_images(queries: torch.Tensor, stream: ImageStream, metric: str, embedding: Embedding | None,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, image) of each query's nearest image in `stream` (the gallery's few queries, one more pass)."""
    rows = queries.flatten(1) if embedding is None else embedding(queries, "gallery samples")
    chunks = (c.flatten(1) for c in _streamed(stream, f"gallery: {stream.name}", progress, embedding))
    distances, indices = knn(rows, chunks, k=1, metric=metric)
    return distances[:, 0], stream.take(indices[:, 0].tolist())


def _to_picture(image: torch.Tensor) -> np.ndarray:
    picture = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return picture[..., 0] if picture.shape[-1] == 1 else picture


def write_gallery(path: str, report: BiasReport, samples: tuple[torch.Tensor, torch.Tensor],
                  train: tuple[ImageStream, ImageStream], metric: str, embedding: Embedding | None,
                  progress: bool, rows: int = GALLERY_ROWS) -> list[int]:
    """The most copy-like pairs (smallest d_own/d_cross of either sample): sample A, its nearest image in A and in
    B, then sample B, its nearest in B and in A, each titled with its distance. Returns the pairs shown."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratio = (report.own_nn / report.cross_nn.clamp_min(1e-300)).min(dim=0).values
    pairs = ratio.argsort()[: min(rows, ratio.numel())].tolist()
    queries = torch.cat([samples[0][pairs], samples[1][pairs]])
    near = [nearest_images(queries, stream, metric, embedding, progress) for stream in train]
    count = len(pairs)
    cells, labels = [], []
    for row, pair in enumerate(pairs):
        for side, (own, cross) in enumerate(((0, 1), (1, 0))):
            q = side * count + row
            cells += [samples[side][pair], near[own][1][q], near[cross][1][q]]
            labels += [f"{'AB'[side]} sample {pair}", f"near {'AB'[own]}: {float(near[own][0][q]):.3g}",
                       f"near {'AB'[cross]}: {float(near[cross][0][q]):.3g}"]
    # one mosaic in one axes: 6·rows separate axes with titles take tens of seconds to lay out
    channels, height, width = cells[0].shape
    pad_y, pad_x = max(2, height // 3), max(1, width // 8)
    mosaic = np.ones(((height + pad_y) * count, (width + pad_x) * 6, 3))
    figure = Figure(figsize=(9, 1.6 * count + 0.4))
    FigureCanvasAgg(figure)
    axis = figure.add_axes((0.01, 0.01, 0.98, 1 - 0.4 / (1.6 * count + 0.4) - 0.01))
    for i, (image, label) in enumerate(zip(cells, labels)):
        y, x = (i // 6) * (height + pad_y) + pad_y, (i % 6) * (width + pad_x)
        picture = _to_picture(image)
        mosaic[y : y + height, x : x + width] = picture[..., None] if picture.ndim == 2 else picture
        axis.text(x + width / 2, y - 0.5, label, ha="center", va="bottom", fontsize=7)
    axis.imshow(mosaic, interpolation="nearest", aspect="auto")
    axis.axis("off")
    figure.suptitle(f"most copy-like pairs (d_own/d_cross, {metric})", fontsize=9)
    write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=100), "wb")
    return pairs


def write_histograms(path: str, report: BiasReport) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), constrained_layout=True)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    own, cross = report.own_nn.flatten().cpu().numpy(), report.cross_nn.flatten().cpu().numpy()
    bins = np.histogram_bin_edges(np.concatenate([own, cross]), bins=40)
    axis.hist(own, bins=bins, alpha=0.6, label="d_own (nearest in its own training set)")
    axis.hist(cross, bins=bins, alpha=0.6, label="d_cross (nearest in the other one)")
    axis.set_xlabel(f"{report.metric} distance")
    axis.set_ylabel("samples")
    axis.legend(fontsize="small")
    write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=110), "wb")


# ---- the command -----------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> AuditConfig:
    for side in ("a", "b"):
        model, samples = getattr(args, f"model_{side}"), getattr(args, f"samples_{side}")
        if (model is None) == (samples is None):
            raise ValueError(f"--model-{side}/--samples-{side}: pass exactly one of them")
    if (args.model_a is None) != (args.model_b is None):
        raise ValueError("--model-a/--model-b: sample both models here, or pass --samples-a and --samples-b")
    for flag, value in (("--n", args.n), ("--steps", args.steps), ("--shard-size", args.shard_size),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag}: expected a positive int, got {value}")
    if args.method not in LOOP_METHODS:
        raise ValueError(f"--method: unknown {args.method!r}; expected one of {LOOP_METHODS}")
    eta = (0.0 if args.method == DPM_SOLVER else 1.0) if args.eta is None else args.eta
    if args.method == DPM_SOLVER and eta != 0.0:
        raise ValueError(f"--eta: DPM-Solver++ is deterministic (eta 0), got {eta}")
    if args.metric not in METRICS or args.metric == "hamming":
        raise ValueError(f"--metric: expected one of {METRICS[:-1]}, got {args.metric!r}")
    if args.schedule not in NAMED_SCHEDULES:
        raise ValueError(f"--schedule: unknown {args.schedule!r}; expected one of {NAMED_SCHEDULES}")
    paths = {k: None if v is None else os.path.abspath(v) for k, v in vars(args).items()
             if k in ("model_a", "model_b", "samples_a", "samples_b", "train_a", "train_b", "test")}
    return AuditConfig(**paths, n=args.n, steps=args.steps, method=args.method, eta=eta, metric=args.metric,
                       seed=args.seed, shard_size=args.shard_size, schedule=args.schedule, features=args.features)


def _prepare_output(out: str, config: AuditConfig, resume: bool) -> None:
    config_path = os.path.join(out, CONFIG_FILE)
    if resume:
        if not os.path.isfile(config_path):
            raise ValueError(f"--resume: {out!r} holds no audit to continue ({CONFIG_FILE} missing)")
        stored = _read_json(config_path, "--resume")
        if stored != asdict(config):
            changed = sorted(k for k in stored if stored.get(k) != asdict(config).get(k))
            raise ValueError(f"--resume: the audit in {out!r} was started with other settings ({', '.join(changed)})")
        return
    if os.path.exists(config_path):
        raise FileExistsError(f"--out: {out!r} already holds an audit; pass --resume to continue it or choose "
                              "another --out")
    write_json_atomic(asdict(config), config_path)


def _versions() -> dict:
    import importlib.metadata

    versions = {}
    for package in ("biasfast", "torch", "numpy", "diffusers", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run_audit(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    fix_mmap_threshold()  # private memory independent of the training sets' size (see _core.memory)
    device = check_device(args.device, "--device")
    config = _config(args)
    progress = not args.no_progress
    train_a, train_b = ImageStream(config.train_a, "--train-a"), ImageStream(config.train_b, "--train-b")
    if train_a.shape != train_b.shape:
        raise ValueError(f"--train-b: images of shape {train_b.shape}, but --train-a's are {train_a.shape}")
    shape = train_a.shape
    test = None
    if config.test is not None:
        test_stream = ImageStream(config.test, "--test")
        if test_stream.shape != shape:
            raise ValueError(f"--test: images of shape {test_stream.shape}, but the training images are {shape}")
        test = test_stream.read_all()
    features = load_features(config.features)
    models, schedule = None, None
    if config.model_a is not None:
        folders = {"--model-a": config.model_a, "--model-b": config.model_b}
        loaded = {flag: load_diffusers_model(folder, flag) for flag, folder in folders.items()}
        for flag, (model, _) in loaded.items():
            check_sample_size(model, shape, flag, folders[flag])
            check_model_shape(model.to(device), shape, flag, device)
        models = [model for model, _ in loaded.values()]
        schedule = agreed_schedule({flag: (folders[flag], scheduler) for flag, (_, scheduler) in loaded.items()},
                                   config.schedule)
    check_disjoint(train_a, train_b)
    checked = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    _prepare_output(args.out, config, args.resume)

    if models is not None:
        samples = sample_shards(models, schedule, shape, config, args.out, device, args.batch_size, progress)
    else:
        samples = (read_samples(config.samples_a, "--samples-a", shape),
                   read_samples(config.samples_b, "--samples-b", shape))
    sampled = time.perf_counter()
    samples = tuple(s.to(device) for s in samples)
    report = bias_score(samples[0], samples[1], _streamed(train_a, "search: --train-a", progress, None),
                        _streamed(train_b, "search: --train-b", progress, None), metric=config.metric,
                        test=None if test is None else test.to(device), features=features)
    searched = time.perf_counter()
    embedding = None if features is None else Embedding(features, device)
    pairs = write_gallery(os.path.join(args.out, "gallery.png"), report, samples, (train_a, train_b), config.metric,
                          embedding, progress)
    write_histograms(os.path.join(args.out, "distances.png"), report)
    finished = time.perf_counter()
    timings = {"checks_s": checked - started, "sampling_s": sampled - checked, "search_s": searched - sampled,
               "pictures_s": finished - searched, "total_s": finished - started}
    payload = {"report": report.to_dict(), "config": asdict(config), "gallery_pairs": pairs,
               "schedule": None if schedule is None else repr(schedule), "timings": timings,
               "versions": _versions()}
    write_json_atomic(payload, os.path.join(args.out, REPORT_FILE))
    print(report.summary())
    print(f"audit: {os.path.join(args.out, REPORT_FILE)}, gallery.png, distances.png ({timings['total_s']:.1f} s)")
    return 0


def add_parser(commands) -> None:
    audit = commands.add_parser("audit", help="bias of two diffusers checkpoints (or their samples) against their "
                                              "training sets: report, gallery, histograms")
    for side in ("a", "b"):
        audit.add_argument(f"--model-{side}", default=None, help="diffusers model or pipeline folder")
        audit.add_argument(f"--samples-{side}", default=None, help="samples made elsewhere (.npy/.npz/image folder)")
    audit.add_argument("--train-a", required=True, help="image folder (PNG/JPEG, recursive), .npy or .npz")
    audit.add_argument("--train-b", required=True, help="the other, disjoint training set")
    audit.add_argument("--test", default=None, help="fresh images (adds the NN divergence)")
    audit.add_argument("--n", type=int, default=1000, help="sample pairs")
    audit.add_argument("--steps", type=int, default=50, help="sampler steps")
    audit.add_argument("--method", default="ddim", help="ddim, ddpm or dpmsolver++ (DPM-Solver++(2M))")
    audit.add_argument("--eta", type=float, default=None, help="DDIM eta (default 1.0; DPM-Solver++ needs 0)")
    audit.add_argument("--metric", default="pearson", help="pearson, cosine, l2 or sqeuclidean")
    audit.add_argument("--features", default=None, metavar="MODULE:NAME",
                       help="an embedding to search in (module or callable; default: pixels)")
    audit.add_argument("--schedule", default="linear", help="named schedule when the folder has no scheduler/")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--device", default="cpu", help="cpu or cuda")
    audit.add_argument("--batch-size", type=int, default=250, help="sampling batch size")
    audit.add_argument("--shard-size", type=int, default=250, help="sample pairs per saved shard")
    audit.add_argument("--out", default=None, help="output folder (default: runs/audit-<time>)")
    audit.add_argument("--resume", action="store_true", help="continue the audit in --out")
    audit.add_argument("--no-progress", action="store_true", help="no progress bars")
    audit.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.out is None:
        if args.resume:
            raise ValueError("--resume: name the audit folder with --out")
        args.out = os.path.join("runs", time.strftime("audit-%Y%m%d-%H%M%S"))
    if "diffusers" not in sys.modules and (args.model_a or args.model_b):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise ImportError("--model-a/--model-b: reading diffusers folders needs diffusers: "
                              "pip install biasfast[diffusers]") from None
    return run_audit(args)
