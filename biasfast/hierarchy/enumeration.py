"""Exhaustive enumeration of the (k-filtered) model's sequences and probabilities: the oracle of the tests.

It walks derivations (every allowed production at every node) rather than passing messages, so it shares no
logic with belief propagation. Sizes grow as q·q_eff^(2^depth − 1) (and faster when filtered): meant for small grammars only.
"""

from __future__ import annotations

import torch

MAX_COMBINATIONS = 2_000_000


def _subtrees(grammar: torch.Tensor, height: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each symbol a: all leaf strings of a subtree of `height` rooted at a, with their probabilities."""
    q = grammar.shape[0]
    tables = [(torch.tensor([[a]]), torch.ones(1, dtype=grammar.dtype)) for a in range(q)]
    for _ in range(height):
        grown = []
        for a in range(q):
            strings, probs = [], []
            for b, c in (grammar[a] > 0).nonzero().tolist():
                (lb, pb), (lc, pc) = tables[b], tables[c]
                left = lb.repeat_interleave(len(lc), 0)
                right = lc.repeat(len(lb), 1)
                strings.append(torch.cat([left, right], dim=1))
                probs.append(grammar[a, b, c] * (pb[:, None] * pc[None, :]).reshape(-1))
            grown.append((torch.cat(strings), torch.cat(probs)))
        tables = grown
    return tables


def enumerate_sequences(grammar: torch.Tensor, depth: int, k: int, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All sequences of positive probability (S, 2^depth) and their probabilities (S,), summing to 1.

    Every combination of (depth-k symbol, subtree below it) over the 2^k blocks is weighed by
    Σ_root (1/q)·Π_j P_j[root, symbol_j]; combinations with the same leaves are merged.
    """
    q, blocks = grammar.shape[0], 2**k
    tables = _subtrees(grammar, depth - k)
    symbols = torch.cat([torch.full((len(t[1]),), a) for a, t in enumerate(tables)])
    strings = torch.cat([t[0] for t in tables])
    probs = torch.cat([t[1] for t in tables])
    count = len(symbols) ** blocks
    if count > MAX_COMBINATIONS:
        raise ValueError(f"grammar: enumeration needs {count} combinations (limit {MAX_COMBINATIONS}); use a smaller model")
    combo = torch.arange(count)[:, None] // len(symbols) ** torch.arange(blocks - 1, -1, -1) % len(symbols)
    weight = probs[combo].prod(1)  # (C,)
    top = torch.stack([path[j][:, symbols[combo[:, j]]] for j in range(blocks)]).prod(0)  # (q roots, C)
    weight = weight * top.sum(0) / q
    keep = weight > 0
    sequences = strings[combo[keep]].reshape(int(keep.sum()), -1)
    sequences, inverse = torch.unique(sequences, dim=0, return_inverse=True)
    merged = torch.zeros(len(sequences), dtype=grammar.dtype).index_add_(0, inverse, weight[keep])
    return sequences, merged
