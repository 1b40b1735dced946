"""Small denoisers for 8×8..32×32 images: a time-conditioned U-Net and an MLP, optionally class-conditional, and
`denoise`, the one place where samplers, trainer and metrics call a model (theirs, a diffusers one, any callable).

Every model has the signature `model(x, t, class_labels=None)` that the samplers expect. Class conditioning
reserves one extra "null" class (index `num_classes`) for classifier-free guidance: `class_labels=None`
means unconditional. `build_model` seeds construction, so models for sets A and B start from identical weights.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

MODEL_KINDS = ("unet", "mlp")


def denoise(model: Callable[..., Any], x: torch.Tensor, t: torch.Tensor,
            class_labels: torch.Tensor | None = None, *, name: str = "model") -> torch.Tensor:
    """model(x, t) as a tensor, for biasfast's models, diffusers models and plain callables alike.

    A model whose forward takes `return_dict` (diffusers' `UNet2DModel`, ...) is called with `class_labels=` by
    keyword (its third positional argument may be something else, e.g. `encoder_hidden_states`) and
    `return_dict=False`; any other callable as `model(x, t)`, or `model(x, t, class_labels)` with labels.
    The output may be a tensor, an object with a tensor `.sample` (diffusers' output classes) or a tuple
    whose first element is the tensor.
    """
    if _takes_return_dict(type(model)):
        extra = {} if class_labels is None else {"class_labels": class_labels}
        output = model(x, t, return_dict=False, **extra)
    else:
        output = model(x, t) if class_labels is None else model(x, t, class_labels)
    return model_output(output, name)


def label_classes(model: Any) -> int | None:
    """The real classes of a class-conditional model, the null class being index `label_classes(model)`; None for
    an unconditional one. biasfast's models: `num_classes` (their embedding has one more row). A diffusers model
    with an embedding of labels (`num_class_embeds` K, `class_embed_type` None) reserves its last row the same
    way: K − 1 classes and null class K − 1, which label dropout and `null_label=K − 1` guidance use."""
    cond = getattr(model, "cond", None)
    if getattr(cond, "num_classes", None):
        return cond.num_classes
    config = getattr(model, "config", None)
    get = getattr(config, "get", None)
    if callable(get) and get("num_class_embeds") and get("class_embed_type") is None:
        if get("num_class_embeds") < 2:
            raise ValueError(f"model: num_class_embeds {get('num_class_embeds')} leaves no class beside the null "
                             "class (the last embedding); build it with num_class_embeds = classes + 1")
        return int(get("num_class_embeds")) - 1
    return None


def model_output(output: Any, name: str = "model") -> torch.Tensor:
    """The prediction tensor in what a denoiser returned: a tensor, `.sample`, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "sample", None), torch.Tensor):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"{name}: expected the model to return a tensor (or an object with .sample), "
                    f"got {type(output).__name__}")


@functools.lru_cache(maxsize=None)
def _takes_return_dict(kind: type) -> bool:
    forward = getattr(kind, "forward", None) if issubclass(kind, nn.Module) else None
    if forward is None:
        return False
    try:
        return "return_dict" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) → (B, dim), as in DDPM/guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1) if dim % 2 else emb


class Conditioning(nn.Module):
    """Time embedding MLP plus an optional class embedding with a null class for classifier-free guidance."""

    def __init__(self, dim: int, num_classes: int | None) -> None:
        super().__init__()
        self.dim = dim
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.class_embedding = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(batch)
        emb = self.time_mlp(timestep_embedding(t, self.dim))
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels: this model was built without num_classes")
            return emb
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=t.device)
        return emb + self.class_embedding(class_labels.long())


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(self.act(emb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A compact U-Net: one ResBlock per level, stride-2 down/up-sampling, skip connections by concatenation.

    `channel_mults` sets the number of levels; the default halves the resolution until it reaches 4×4.
    `out_channels` defaults to `in_channels`; 2·in_channels for a learned-variance model (prediction, then v).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, base_channels: int = 32,
                 channel_mults: tuple[int, ...] | None = None, num_classes: int | None = None,
                 out_channels: int | None = None) -> None:
        super().__init__()
        if channel_mults is None:
            levels = max(1, int(math.log2(max(image_size, 4) // 4)) + 1)
            channel_mults = tuple(min(2**i, 4) for i in range(levels))
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"image_size: {image_size} is not divisible by 2^{len(channel_mults) - 1} "
                             f"(channel_mults {channel_mults})")
        emb_dim = 4 * base_channels
        self.cond = Conditioning(emb_dim, num_classes)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = base_channels
        for i, w in enumerate(widths):
            self.down.append(ResBlock(ch, w, emb_dim))
            ch = w
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(ResBlock(ch + w, w, emb_dim))
            ch = w
            self.upsample.append(nn.Identity() if i == 0 else nn.ConvTranspose2d(w, widths[i - 1], 4, 2, 1))
            ch = w if i == 0 else widths[i - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, out_channels or in_channels, 3,
                                                                                 padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.cond(t, class_labels, x.shape[0])
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up, self.upsample):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return self.out(h)


class MLPDenoiser(nn.Module):
    """Flattened-pixel MLP with the time (and class) embedding added before every hidden layer; `out_channels`
    as in `UNet`."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, hidden: int = 512, depth: int = 3,
                 num_classes: int | None = None, out_channels: int | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels or in_channels
        features = in_channels * image_size * image_size
        self.cond = Conditioning(hidden, num_classes)
        self.inp = nn.Linear(features, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, self.out_channels * image_size * image_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.cond(t, class_labels, x.shape[0])
        h = self.act(self.inp(x.flatten(1)) + emb)
        for layer in self.hidden:
            h = self.act(layer(h) + emb)
        return self.out(h).view(x.shape[0], self.out_channels, *x.shape[2:])


def build_model(kind: str = "unet", *, in_channels: int = 1, image_size: int = 8, seed: int = 0,
                num_classes: int | None = None, **kwargs) -> nn.Module:
    """Construct a denoiser with weights drawn from `seed` only (the global RNG is left untouched)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model: unknown kind {kind!r}; expected one of {MODEL_KINDS}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")
    cls = UNet if kind == "unet" else MLPDenoiser
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs)


def drop_labels(labels: torch.Tensor, p: float, num_classes: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Replace each label by the null class `num_classes` with probability p (classifier-free guidance training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label_dropout: expected a probability in [0, 1], got {p!r}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, num_classes), labels)
