"""The CUDA kernel of `biasfast::tree_bp`, in Triton: exact belief propagation on the hierarchical model's tree.

Same schema and results as the C++ kernel (csrc/cpu/tree_bp.cpp), registered as the op's CUDA kernel by
biasfast/ops/tree_bp.py. One program owns a block
of sequences; q, depth and the filter level k are compile-time constants, so both sweeps unroll and every level's
messages stay in registers as (sequences, nodes, symbols) tensors. The grammar is used densely (zeros add
nothing). Messages are renormalised at every node; a row whose normaliser falls below linear-space range is
flagged, and a second launch recomputes exactly those rows with the same code in log space (blocks without a
flagged row return at once), so there is no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Elements of the largest per-program intermediate, (sequences × nodes × q × q), which sets the block of sequences:
# larger for the linear-space pass, small for the rare log-space one (its exp/log code is ~3× larger to compile).
REGISTER_BUDGET = {False: 4096, True: 1024}
MAX_BLOCK = 128


# The two sweeps are written once over a semiring: (+, ×) on messages in linear space, (log-add-exp, +) on their
# logarithms for the rows out of linear range (LOG=True). Helpers are coarse on purpose: each nested call costs
# the interpreter (which the tests use) about 10 ms.


@triton.jit
def _contract(x, y, AXIS: tl.constexpr, LOG: tl.constexpr):
    """⊕ over AXIS of x ⊗ y (broadcast): a sum of products, or a log-sum-exp of sums (−inf for all −inf)."""
    if LOG:
        terms = x + y
        top = tl.max(terms, axis=AXIS)
        safe = tl.where(top == float("-inf"), 0.0, top)
        return safe + tl.log(tl.sum(tl.exp(terms - tl.expand_dims(safe, AXIS)), axis=AXIS))
    else:
        return tl.sum(x * y, axis=AXIS)


@triton.jit
def _accumulate(total, x, y, LOG: tl.constexpr):
    """total ⊕ (x ⊗ y), elementwise."""
    if LOG:
        terms = x + y
        top = tl.maximum(total, terms)
        safe = tl.where(top == float("-inf"), 0.0, top)
        return safe + tl.log(tl.exp(total - safe) + tl.exp(terms - safe))
    else:
        return total + x * y


@triton.jit
def _normalise(m, log_z, bad, TINY: tl.constexpr, LOG: tl.constexpr):
    """(sequences, nodes, symbols) messages scaled to total 1 per node. Returns them, log_z plus the log of each
    row's normalisers, and `bad` or'ed with rows whose normaliser is tiny, zero or NaN (linear space only)."""
    if LOG:
        total = _contract(m, 0.0, 2, LOG)
        m = m - tl.expand_dims(tl.where(total == float("-inf"), 0.0, total), 2)
        log_z += tl.sum(total, axis=1)
    else:
        total = tl.sum(m, axis=2)
        m = m / tl.expand_dims(total, 2)
        log_z += tl.sum(tl.log(total), axis=1)
        bad = bad | (tl.min((total >= TINY).to(tl.int32), axis=1) == 0)
    return m, log_z, bad


@triton.jit
def _children(level):
    """(sequences, 2N, symbols) messages split into those of the left and the right children of N parents."""
    pairs = tl.reshape(level, (level.shape[0], level.shape[1] // 2, 2, level.shape[2]))
    return tl.split(tl.permute(pairs, (0, 1, 3, 2)))


@triton.jit
def _interleave(left, right):
    """Inverse of _children: (sequences, N, symbols) twice into (sequences, 2N, symbols), siblings adjacent."""
    pairs = tl.permute(tl.join(left, right), (0, 1, 3, 2))
    return tl.reshape(pairs, (left.shape[0], left.shape[1] * 2, left.shape[2]))


@triton.jit
def _belief_propagation(field, grammar_ptr, top_ptr, Q: tl.constexpr, QP: tl.constexpr, DEPTH: tl.constexpr,
                        K: tl.constexpr, J: tl.constexpr, DT: tl.constexpr, TINY: tl.constexpr,
                        LOG_Q: tl.constexpr, LOG: tl.constexpr):
    """Leaf posteriors, log partition and out-of-range flags of a block of sequences.

    `field` (BLOCK, 2^DEPTH, QP): leaf log-potentials, −inf in the padding symbols. Same message schedule as
    csrc/cpu/hierarchy_bp_lanes.h: upward to depth K, root messages through the top matrices, cavities, downward.
    """
    sym = tl.arange(0, QP)[None, None, :]
    b = tl.arange(0, QP)[:, None]
    c = tl.arange(0, QP)[None, :]
    rules = ()  # rules[a]: M[a, :, :] as a (QP, QP) tile, padded with the semiring's zero
    for a in tl.static_range(Q):
        rule = tl.load(grammar_ptr + (a * Q + b) * Q + c, mask=(b < Q) & (c < Q), other=0.0).to(DT)
        if LOG:
            rule = tl.log(rule)
        rules = rules + (rule,)

    lead = tl.max(field, axis=2)
    bad = tl.min(((lead == lead) & (lead != float("-inf"))).to(tl.int32), axis=1) == 0
    log_z = tl.sum(lead, axis=1)
    up = field - tl.expand_dims(tl.where(lead == float("-inf"), 0.0, lead), 2)
    if not LOG:
        up = tl.exp(up)
    ups = (up,)  # ups[i]: the messages of depth DEPTH - i
    for _ in tl.static_range(DEPTH - K):  # upward: u_v(a) ∝ Σ_bc M[a,b,c] u_l(b) u_r(c)
        left, right = _children(up)
        if LOG:
            pairs = tl.expand_dims(left, 3) + tl.expand_dims(right, 2)
        else:
            pairs = tl.expand_dims(left, 3) * tl.expand_dims(right, 2)
        pairs = tl.reshape(pairs, (left.shape[0], left.shape[1], QP * QP))
        up = tl.full(left.shape, float("-inf") if LOG else 0.0, DT)
        for a in tl.static_range(Q):
            weight = _contract(pairs, tl.reshape(rules[a], (QP * QP,))[None, None, :], 2, LOG)
            up = tl.where(sym == a, tl.expand_dims(weight, 2), up)
        up, log_z, bad = _normalise(up, log_z, bad, TINY, LOG)
        ups = ups + (up,)

    # Top: m_j = P_j u_j to the root, root ∝ Π_j m_j (uniform prior), cavities Π_{j'≠j} m_j', d_j = P_jᵀ cavity.
    j = tl.arange(0, J)[None, :, None]
    a_top = tl.arange(0, QP)[:, None]
    b_top = tl.arange(0, QP)[None, :]
    top = tl.load(top_ptr + (tl.arange(0, J)[:, None, None] * Q + a_top[None]) * Q + b_top[None],
                  mask=(a_top[None] < Q) & (b_top[None] < Q), other=0.0).to(DT)
    if LOG:
        top = tl.log(top)
    to_root = _contract(top[None, :, :, :], tl.expand_dims(up, 2), 3, LOG)
    to_root, log_z, bad = _normalise(to_root, log_z, bad, TINY, LOG)
    root = tl.full((up.shape[0], QP), 0.0 if LOG else 1.0, DT)
    cavity = tl.full(up.shape, 0.0 if LOG else 1.0, DT)
    for node in tl.static_range(J):
        message = tl.sum(tl.where(j == node, to_root, 0.0), axis=1)
        if LOG:
            root = root + message
            cavity = tl.where(j == node, cavity, cavity + message[:, None, :])
        else:
            root = root * message
            cavity = tl.where(j == node, cavity, cavity * message[:, None, :])
    root = _contract(root, 0.0 if LOG else 1.0, 1, LOG)
    if LOG:
        log_z += root - LOG_Q
    else:
        log_z += tl.log(root) - LOG_Q
        bad = bad | ((root >= TINY) == 0)
    down = _contract(top[None, :, :, :], tl.expand_dims(cavity, 3), 2, LOG)
    down, _, bad = _normalise(down, log_z, bad, TINY, LOG)

    for i in tl.static_range(DEPTH - K):  # downward: d_l(b) ∝ Σ_ac d_v(a) M[a,b,c] u_r(c), symmetric for d_r
        left, right = _children(ups[DEPTH - K - 1 - i])
        weights = tl.full((left.shape[0], left.shape[1], QP, QP), float("-inf") if LOG else 0.0, DT)
        for a in tl.static_range(Q):
            parent = tl.max(tl.where(sym == a, down, float("-inf")), axis=2)
            weights = _accumulate(weights, parent[:, :, None, None], rules[a][None, None, :, :], LOG)
        to_left, _, bad = _normalise(_contract(weights, tl.expand_dims(right, 2), 3, LOG), log_z, bad, TINY, LOG)
        to_right, _, bad = _normalise(_contract(weights, tl.expand_dims(left, 3), 2, LOG), log_z, bad, TINY, LOG)
        down = _interleave(to_left, to_right)

    if LOG:
        belief, _, bad = _normalise(ups[0] + down, log_z, bad, TINY, LOG)
        impossible = tl.expand_dims(tl.expand_dims(log_z == float("-inf"), 1), 2)
        belief = tl.where(impossible, float("nan"), tl.exp(belief))
    else:
        belief, _, bad = _normalise(ups[0] * down, log_z, bad, TINY, LOG)
    return belief, log_z, bad


@triton.jit
def _tree_bp_kernel(evidence_ptr, scale_ptr, grammar_ptr, top_ptr, out_ptr, log_z_ptr, redo_ptr, batch,
                    Q: tl.constexpr, QP: tl.constexpr, DEPTH: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                    DT: tl.constexpr, TINY: tl.constexpr, LOG_Q: tl.constexpr, LOG: tl.constexpr):
    """LOG=False: every row in linear space, flagging rows out of range in `redo`; LOG=True: the flagged rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < batch
    leaf = tl.arange(0, 2**DEPTH)[None, :, None]
    sym = tl.arange(0, QP)[None, None, :]
    offsets = (rows[:, None, None] * 2**DEPTH + leaf) * Q + sym
    mask = valid[:, None, None] & (sym < Q)
    rewrite = valid
    if LOG:
        rewrite = rewrite & (tl.load(redo_ptr + rows, mask=valid, other=0) != 0)
    if tl.max(rewrite.to(tl.int32), axis=0) > 0:
        scale = tl.load(scale_ptr + rows, mask=valid, other=1.0).to(DT)
        evidence = tl.load(evidence_ptr + offsets, mask=mask, other=0.0).to(DT)
        field = tl.where(sym < Q, scale[:, None, None] * evidence, float("-inf"))
        belief, log_z, bad = _belief_propagation(field, grammar_ptr, top_ptr, Q, QP, DEPTH, K, 2**K, DT, TINY,
                                                 LOG_Q, LOG)
        tl.store(out_ptr + offsets, belief.to(out_ptr.dtype.element_ty), mask=mask & rewrite[:, None, None])
        tl.store(log_z_ptr + rows, log_z.to(log_z_ptr.dtype.element_ty), mask=rewrite)
        if not LOG:
            tl.store(redo_ptr + rows, bad.to(tl.int8), mask=valid)


def _argument_error(name: str, message: str) -> ValueError:
    return ValueError(f"biasfast: argument '{name}': {message}")  # the wording of the C++ op's checks


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_arguments(evidence: torch.Tensor, scale: torch.Tensor, grammar: torch.Tensor, top: torch.Tensor) -> None:
    """The C++ op's shape, dtype and device checks, with the same messages."""
    if evidence.dim() != 3:
        raise _argument_error("evidence", f"expected a (batch, leaves, q) tensor, got shape {list(evidence.shape)}")
    batch, leaves, q = evidence.shape
    if not (leaves >= 2 and _is_power_of_two(leaves)):
        raise _argument_error("evidence", f"the number of leaves must be a power of two >= 2, got {leaves}")
    if q < 1:
        raise _argument_error("evidence", "needs at least one symbol")
    if scale.dim() != 1 or scale.shape[0] != batch:
        raise _argument_error("scale", f"expected shape ({batch}), got {list(scale.shape)}")
    if tuple(grammar.shape) != (q, q, q):
        raise _argument_error("grammar", f"expected shape ({q}, {q}, {q}), got {list(grammar.shape)}")
    if top.dim() != 3 or not _is_power_of_two(top.shape[0]) or top.shape[0] > leaves or tuple(top.shape[1:]) != (q, q):
        raise _argument_error("top", f"expected shape (2^k, {q}, {q}) with 2^k <= {leaves}, got {list(top.shape)}")
    for name, t in (("evidence", evidence), ("scale", scale), ("grammar", grammar), ("top", top)):
        if not t.is_floating_point():
            raise _argument_error(name, f"expected a floating dtype, got {t.dtype}")
        if t.device != evidence.device:
            raise _argument_error(name, f"is on {t.device} but evidence is on {evidence.device}")


def launch_constants(q: int, leaves: int, top_nodes: int, dtype: torch.dtype, log_space: bool) -> dict:
    """The kernel's compile-time arguments for one pass (also used by the compile test)."""
    q_padded = triton.next_power_of_2(q)
    largest = max(leaves // 2 * q_padded**2, top_nodes * q_padded**2, top_nodes**2 * q_padded, leaves * q_padded)
    block = min(MAX_BLOCK, 1 << max(0, (REGISTER_BUDGET[log_space] // largest).bit_length() - 1))
    double = dtype == torch.float64
    compute = tl.float64 if double or log_space else tl.float32  # log space in float64 as the C++ op: |h| ~ 1e3
    return dict(Q=q, QP=q_padded, DEPTH=leaves.bit_length() - 1, K=top_nodes.bit_length() - 1, BLOCK=block,
                DT=compute, TINY=1e-290 if double else 1e-30, LOG_Q=math.log(q), LOG=log_space)


def tree_bp(evidence: torch.Tensor, scale: torch.Tensor, grammar: torch.Tensor,
                   top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_arguments(evidence, scale, grammar, top)
    batch, leaves, q = evidence.shape
    dtype = torch.float64 if evidence.dtype == torch.float64 else torch.float32
    ev, sc = evidence.to(dtype).contiguous(), scale.to(dtype).contiguous()
    gr, tp = grammar.to(dtype).contiguous(), top.to(dtype).contiguous()
    out = torch.empty((batch, leaves, q), dtype=dtype, device=evidence.device)
    log_z = torch.empty((batch,), dtype=dtype, device=evidence.device)
    if batch == 0:
        return out, log_z
    redo = torch.empty((batch,), dtype=torch.int8, device=evidence.device)
    for log_space in (False, True):
        constants = launch_constants(q, leaves, top.shape[0], dtype, log_space)
        grid = (triton.cdiv(batch, constants["BLOCK"]),)
        _tree_bp_kernel[grid](ev, sc, gr, tp, out, log_z, redo, batch, **constants)
    return out, log_z

