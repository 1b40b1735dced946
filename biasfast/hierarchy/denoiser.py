"""`SequenceDenoiser`: the transformer that predicts x0 logits from noised one-hot sequences.

The architecture of the paper's `TransformerForDiffusion`: Linear(q → width) plus a learned positional embedding
plus a time embedding Linear(sinusoidal(t, 32) → width), an `nn.TransformerEncoder` (batch first, 4 heads,
feed-forward 2·width) and Linear(width → q). The paper uses width 512 and 8 layers; the CPU default is 128 and 4.
"""

from __future__ import annotations

import torch
from torch import nn

from biasfast.diffusion.models import timestep_embedding

TIME_FEATURES = 32  # sinusoidal features of t before the linear time embedding
CPU_SIZE = {"width": 128, "layers": 4}
PAPER_SIZE = {"width": 512, "layers": 8}


class SequenceDenoiser(nn.Module):
    """x0 logits (B, L, q) from x_t (B, L, q) and integer timesteps t (B,) in [1, T]."""

    def __init__(self, q: int, length: int, width: int = 128, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("q", q), ("length", length), ("width", width), ("layers", layers), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if width % heads:
            raise ValueError(f"width: must be divisible by heads = {heads}, got {width}")
        self.q, self.length = q, length
        self.embed = nn.Linear(q, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * 0.02)
        self.time = nn.Linear(TIME_FEATURES, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, q)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 3 or tuple(x_t.shape[1:]) != (self.length, self.q):
            raise ValueError(f"x_t: expected shape (batch, {self.length}, {self.q}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        time = self.time(timestep_embedding(t, TIME_FEATURES).to(x_t.dtype))[:, None, :]
        return self.head(self.encoder(self.embed(x_t) + self.position + time))
