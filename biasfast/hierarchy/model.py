"""FilteredHierarchicalModel: the controlled data model of the biased-generalization paper, with exact inference.

A complete binary tree of `depth` levels over q symbols; the root is uniform and every node emits its two children
with one shared grammar M (see `grammar.py`). Because the grammar is unambiguous and the graph a tree, belief
propagation gives exact posteriors: the Bayes-optimal denoiser E[x0 | x_t] of Gaussian diffusion on one-hot tokens,
its k-filtered "coarse" versions BP_k, likelihoods and exact posterior samples.
"""

from __future__ import annotations

import numpy as np
import torch

from biasfast.hierarchy import bp
from biasfast.hierarchy.enumeration import enumerate_sequences
from biasfast.hierarchy.grammar import make_grammar, path_matrices
from biasfast.hierarchy.sampling import _draw, sample_leaves
from biasfast.ops.tree_bp import tree_bp

_ROWS_PER_CHUNK = 8192  # `rows` draws the dataset in fixed chunks, so any slice is reproducible on its own
_SPLIT_ROUNDS = 50  # batches of fresh rows `split` tries before it declares the support exhausted


class FilteredHierarchicalModel:
    """The filtered hierarchical model (q symbols, 2^depth leaves, q_eff productions per symbol)."""

    def __init__(self, q: int = 6, depth: int = 4, sigma: float = 1.0, q_eff: int = 4, seed: int = 0):
        for name, value in (("q", q), ("depth", depth), ("q_eff", q_eff), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if q < 2:
            raise ValueError(f"q: need at least 2 symbols, got {q}")
        if depth < 1:
            raise ValueError(f"depth: must be at least 1, got {depth}")
        if not 1 <= q_eff <= q:
            raise ValueError(f"q_eff: must lie in [1, q] = [1, {q}], got {q_eff}")
        if not sigma > 0:
            raise ValueError(f"sigma: must be positive, got {sigma}")
        self.q, self.depth, self.sigma, self.q_eff, self.seed = q, depth, float(sigma), q_eff, seed
        self.grammar, self.forbidden_pairs = make_grammar(q, self.sigma, q_eff, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self._paths: dict[int, torch.Tensor] = {}
        self._enumerations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    def __repr__(self) -> str:
        return (f"FilteredHierarchicalModel(q={self.q}, depth={self.depth}, sigma={self.sigma}, q_eff={self.q_eff}, "
                f"seed={self.seed})")

    def path_matrices(self, k: int = 0) -> torch.Tensor:
        """P_j (2^k, q, q), float64: P(depth-k node j = b | root = a)."""
        self._check_level(k)
        if k not in self._paths:
            self._paths[k] = path_matrices(self.grammar, k)
        return self._paths[k]

    # ---- data ----

    def sample(self, n: int, k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n sequences (n, 2^depth) of int64 tokens from the k-filtered model (k = 0: the full model).

        Without a generator the model's own (seeded by `seed`) is used, so a fresh model replays the same draws.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        return sample_leaves(self.grammar, self.depth, n, k, self.path_matrices(k), generator or self.generator)

    def rows(self, start: int, stop: int, k: int = 0, stream: int = 0) -> torch.Tensor:
        """Rows [start, stop) of a fixed, reproducible dataset (one per seed, k and stream), drawn in chunks."""
        if not 0 <= start <= stop:
            raise ValueError(f"rows: need 0 <= start <= stop, got start={start}, stop={stop}")
        self._check_level(k)
        chunks = []
        for chunk in range(start // _ROWS_PER_CHUNK, -(-stop // _ROWS_PER_CHUNK)):
            state = int(np.random.SeedSequence([self.seed, k, stream, chunk]).generate_state(1)[0])
            rows = self.sample(_ROWS_PER_CHUNK, k, torch.Generator().manual_seed(state))
            lo = max(start - chunk * _ROWS_PER_CHUNK, 0)
            chunks.append(rows[lo : min(stop - chunk * _ROWS_PER_CHUNK, _ROWS_PER_CHUNK)])
        return torch.cat(chunks) if chunks else torch.empty(0, self.num_leaves, dtype=torch.int64)

    def split(self, n_train: int, n_test: int, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(training block `block` = rows [block·n_train, (block+1)·n_train), test set), k = 0.

        Different blocks are disjoint draws; the test set comes from its own stream and contains no sequence of
        the training block (exact copies are dropped and replaced).
        """
        if n_train < 0 or n_test < 0 or block < 0:
            raise ValueError(f"split: sizes and block must be non-negative, got {n_train}, {n_test}, {block}")
        train = self.rows(block * n_train, (block + 1) * n_train)
        seen = self.encode(train)
        test, start = [], 0
        for _ in range(_SPLIT_ROUNDS):
            if sum(len(t) for t in test) >= n_test:
                break
            fresh = self.rows(start, start + n_test, stream=1)
            start += n_test
            test.append(fresh[~torch.isin(self.encode(fresh), seen)])
        else:
            raise ValueError(f"split: fewer than {n_test} test sequences outside the training block turned up in "
                             f"{_SPLIT_ROUNDS} rounds; the model's support is too small for these sizes")
        return train, torch.cat(test)[:n_test] if test else self.rows(0, 0)

    def encode(self, sequences: torch.Tensor) -> torch.Tensor:
        """One int64 per sequence (base-q digits), for exact set operations on sequences."""
        if self.q**self.num_leaves >= 2**63:
            raise ValueError("encode: q^(2^depth) does not fit in int64")
        weights = self.q ** torch.arange(self.num_leaves - 1, -1, -1, dtype=torch.int64)
        return (sequences.to(torch.int64) * weights).sum(-1)

    def enumerate(self, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence of positive probability (S, 2^depth) and its probability (S,): small grammars only."""
        if k not in self._enumerations:
            self._enumerations[k] = enumerate_sequences(self.grammar, self.depth, k, self.path_matrices(k))
        return self._enumerations[k]

    # ---- exact inference ----

    def exact_denoiser(self, x_t: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] (same shape as x_t) for x_t = sqrt(ᾱ)·onehot(x0) + sqrt(1 − ᾱ)·ε; ᾱ scalar or per sample."""
        return self.filtered_denoiser(x_t, alpha_bar, 0)

    def filtered_denoiser(self, x_t: torch.Tensor, alpha_bar: float | torch.Tensor, k: int) -> torch.Tensor:
        """BP_k: the exact denoiser of the k-filtered model (top k levels independent given the root)."""
        x_t, alpha = bp.check_noisy(x_t, alpha_bar, self.q, self.num_leaves)
        evidence, scale = bp.gaussian_evidence(x_t, alpha)
        marginals, _ = self._run(evidence, k, scale)
        return marginals.reshape(x_t.shape)

    def log_likelihood(self, sequences: torch.Tensor, k: int = 0) -> torch.Tensor:
        """log P(sequence) (B,) in float64, exact; −inf for sequences the grammar cannot produce."""
        tokens = bp.check_sequences(sequences, self.q, self.num_leaves, "sequences")
        return self._run(bp.token_evidence(tokens, self.q, torch.float64), k)[1]

    def masked_posterior(self, tokens: torch.Tensor, mask: torch.Tensor, k: int = 0) -> torch.Tensor:
        """P(x_i = a | unmasked tokens) (B, L, q), float64; `mask` (B, L) is True where a token is hidden."""
        tokens = bp.check_sequences(tokens, self.q, self.num_leaves, "tokens")
        bp.check_tensor(mask, "mask")
        if mask.dtype != torch.bool or mask.shape != tokens.shape:
            raise ValueError(f"mask: expected a bool tensor of shape {tuple(tokens.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        marginals, log_z = self._run(bp.token_evidence(tokens, self.q, torch.float64, mask), k)
        impossible = torch.isneginf(log_z)
        if bool(impossible.any()):
            rows = impossible.nonzero().flatten()[:5].tolist()
            raise ValueError(f"tokens: the unmasked tokens of rows {rows} cannot occur under this grammar")
        return marginals

    def sample_posterior(
        self, x_t: torch.Tensor, alpha_bar: float | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact samples x0 ~ p(x0 | x_t) (*batch, 2^depth), int64, drawn top-down from log-space upward messages."""
        x_t, alpha = bp.check_noisy(x_t, alpha_bar, self.q, self.num_leaves)
        evidence, scale = bp.gaussian_evidence(x_t.double(), alpha)
        log_up = [scale[:, None, None] * evidence]  # log_up[0]: leaves; log_up[-1]: the root
        log_m = self.grammar.log()
        for _ in range(self.depth):
            child = log_up[-1]
            terms = log_m + child[:, 0::2, None, :, None] + child[:, 1::2, None, None, :]
            log_up.append(terms.flatten(-2).logsumexp(-1))
        impossible = torch.isneginf(log_up[-1][:, 0].amax(-1))
        if bool(impossible.any()):  # only at ᾱ = 1, when the noiseless x_t is no sequence of the grammar
            rows = impossible.nonzero().flatten()[:5].tolist()
            raise ValueError(f"x_t: rows {rows} at alpha_bar = 1 are not sequences this grammar can produce")
        generator = generator or self.generator
        nodes = _draw(_softmax(log_up[-1][:, 0]), generator)[:, None]
        for child in reversed(log_up[:-1]):
            logits = log_m[nodes] + child[:, 0::2, :, None] + child[:, 1::2, None, :]
            pair = _draw(_softmax(logits.flatten(-2)), generator)
            nodes = torch.stack([pair // self.q, pair % self.q], dim=-1).flatten(1)
        return nodes.reshape(x_t.shape[:-1])

    def _run(self, evidence: torch.Tensor, k: int, scale: torch.Tensor | None = None):
        top = self.path_matrices(k)
        dtype = evidence.dtype if evidence.dtype == torch.float64 else torch.float32
        return tree_bp(evidence, self.grammar.to(evidence.device, dtype), top.to(evidence.device, dtype), scale)

    def _check_level(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k <= self.depth:
            raise ValueError(f"k: the filtering level must be an int in [0, depth] = [0, {self.depth}], got {k!r}")


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits - logits.amax(-1, keepdim=True))
