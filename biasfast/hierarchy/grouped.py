"""`GroupedDenoiser`: several `SequenceDenoiser`s of one architecture trained as one batched computation.

The pair of a sample split is two small transformers whose every step is dominated by per-operator overhead on the
CPU (a width-64 network on 128 sequences spends most of its time outside the matrix products). Stacking the two
networks' weights along a leading group axis and running every linear layer as one `baddbmm` and every attention
as one `scaled_dot_product_attention` over (group, batch, head) does the work of both in the operator count of one.
The mathematics is that of `nn.TransformerEncoderLayer` (post-norm, ReLU, no dropout) term by term, so the
outputs and gradients of group g equal network g's up to float rounding (bmm vs mm summation order).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from biasfast.diffusion.models import timestep_embedding
from biasfast.hierarchy.denoiser import TIME_FEATURES, SequenceDenoiser


def _check_compatible(networks: Sequence[SequenceDenoiser]) -> None:
    if not networks or not all(isinstance(n, SequenceDenoiser) for n in networks):
        raise TypeError("networks: expected a non-empty sequence of SequenceDenoiser")
    shapes = [[(k, tuple(v.shape)) for k, v in n.state_dict().items()] for n in networks]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("networks: all networks must have the same architecture (parameter names and shapes)")
    for layer in networks[0].encoder.layers:
        if layer.norm_first or layer.activation_relu_or_gelu != 1 or layer.dropout.p or layer.dropout1.p:
            raise ValueError("networks: only post-norm ReLU encoder layers without dropout can be grouped")


class GroupedDenoiser(nn.Module):
    """x0 logits (G, B, L, q) of G networks from x_t (G, B, L, q) and timesteps t (G, B): group g runs network g."""

    def __init__(self, networks: Sequence[SequenceDenoiser]) -> None:
        super().__init__()
        _check_compatible(networks)
        first = networks[0]
        self.q, self.length, self.groups = first.q, first.length, len(networks)
        self.heads = first.encoder.layers[0].self_attn.num_heads
        self.num_layers = len(first.encoder.layers)
        self.names = list(first.state_dict())
        states = [n.state_dict() for n in networks]
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([s[name].detach() for s in states]).clone()) for name in self.names)
        self._index = {name: i for i, name in enumerate(self.names)}

    def _p(self, name: str) -> torch.Tensor:
        return self.stacked[self._index[name]]

    def _linear(self, h: torch.Tensor, prefix: str, weight: str = "weight", bias: str = "bias") -> torch.Tensor:
        """h (G, N, in) @ W_gᵀ + b_g for the stacked nn.Linear (or in-projection) `prefix`."""
        return torch.baddbmm(self._p(f"{prefix}.{bias}")[:, None, :], h, self._p(f"{prefix}.{weight}").transpose(1, 2))

    def _norm(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        normed = F.layer_norm(h, h.shape[-1:])
        return normed * self._p(f"{prefix}.weight")[:, None, :] + self._p(f"{prefix}.bias")[:, None, :]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        groups, batch = x_t.shape[:2]
        if x_t.dim() != 4 or groups != self.groups or tuple(x_t.shape[2:]) != (self.length, self.q):
            raise ValueError(f"x_t: expected shape ({self.groups}, batch, {self.length}, {self.q}), "
                             f"got {tuple(x_t.shape)}")
        if tuple(t.shape) != (groups, batch):
            raise ValueError(f"t: expected shape ({groups}, {batch}), got {tuple(t.shape)}")
        length, heads = self.length, self.heads
        features = timestep_embedding(t.reshape(-1), TIME_FEATURES).to(x_t.dtype).reshape(groups, batch, -1)
        time = self._linear(features, "time")
        h = self._linear(x_t.reshape(groups, batch * length, self.q), "embed").reshape(groups, batch, length, -1)
        width = h.shape[-1]
        h = (h + self._p("position") + time[:, :, None, :]).reshape(groups, batch * length, width)
        for i in range(self.num_layers):
            layer = f"encoder.layers.{i}"
            qkv = self._linear(h, f"{layer}.self_attn", "in_proj_weight", "in_proj_bias")
            qkv = qkv.reshape(groups, batch, length, 3, heads, width // heads).permute(3, 0, 1, 4, 2, 5)
            attention = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (G, B, heads, L, width/heads)
            attention = attention.transpose(2, 3).reshape(groups, batch * length, width)
            h = self._norm(h + self._linear(attention, f"{layer}.self_attn.out_proj"), f"{layer}.norm1")
            feed_forward = self._linear(F.relu(self._linear(h, f"{layer}.linear1")), f"{layer}.linear2")
            h = self._norm(h + feed_forward, f"{layer}.norm2")
        return self._linear(h, "head").reshape(groups, batch, length, self.q)

    def network_state(self, group: int) -> dict[str, torch.Tensor]:
        """The `SequenceDenoiser` state dict of group `group` (a copy: saving it does not pin the stack)."""
        return {name: p[group].detach().clone() for name, p in zip(self.names, self.stacked)}
