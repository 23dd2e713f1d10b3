"""TIES-Merging kernels (trim, elect sign, disjoint merge) over one flat chunk: tensors in, tensors out.

Inputs are the base chunk ``base`` [N] and the stacked experts ``experts`` [T, N] in any float
dtype; everything is computed in float32 in one pass (fusable by torch.compile, see
workers/compiled.py). Trim rules arrive per expert as ``thr`` (keep |τ| > thr) and ``cut`` (a
tie |τ| == thr is kept when its flat index in the chunk is <= cut; ALL_TIES keeps every tie,
-1 none), so a tie quota spanning row chunks is exact.
"""

from __future__ import annotations

import torch

from workers.kernels.diagnostics import vote_counts
from workers.kernels.selection import TrimRule

ALL_TIES = 1 << 62


def sum_in_order(terms):
    """Σ of a sequence of same-shaped tensors, added strictly in order (expert order), so bytes
    never depend on chunk size and eager and compiled forms agree."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def trimmed(base, experts, thr, cut) -> list:
    """Per expert, the trimmed τ_t in float32, shaped as the chunk (a list: one fused loop when compiled)."""
    b = base.float()
    index = torch.arange(b.numel(), device=b.device).view(b.shape)
    kept = []
    for t in range(experts.shape[0]):
        tau = experts[t].float() - b
        magnitude = tau.abs()
        keep = (magnitude > thr[t]) | ((magnitude == thr[t]) & (index <= cut[t]))
        kept.append(torch.where(keep, tau, 0.0))
    return kept


def trimmed_weighted(base, experts, thr, cut, weights) -> list:
    """Per expert, w_t · trimmed τ_t."""
    return [x * weights[t] for t, x in enumerate(trimmed(base, experts, thr, cut))]


def vote(weighted: list, sign_by_count: bool):
    """γ = sign(Σ w·τ) (mass) or sign(Σ sign(w·τ)) (count), summed in expert order; 0 where tied."""
    return torch.sign(sum_in_order([torch.sign(x) for x in weighted] if sign_by_count else weighted))


def elect(base, experts, thr, cut, weights, zero_sign, sign_by_count: bool):
    """(τ̂_t, w_t·τ̂_t, w_t·τ̂_t·γ) per expert, γ the elected sign with 0 replaced by ``zero_sign``."""
    kept = trimmed(base, experts, thr, cut)
    weighted = [x * weights[t] for t, x in enumerate(kept)]
    gamma = vote(weighted, sign_by_count)
    gamma = torch.where(gamma == 0, zero_sign, gamma)
    return kept, weighted, [x * gamma for x in weighted]


def ties_merge(base, experts, thr, cut, weights, lam, zero_sign, *, sign_by_count: bool, normalize: bool,
               out_dtype: torch.dtype, counted: bool = False):
    """θ₀ + λ·τ_m: the w·τ agreeing with γ summed (divided by their Σw when ``normalize``; 0 where
    none agree), γ = 0 replaced by ``zero_sign``. Scalars come as 0-d float32 tensors. ``counted``:
    (θ, ``vote_counts`` of the chunk), for the diagnostics."""
    kept, weighted, signed = elect(base, experts, thr, cut, weights, zero_sign, sign_by_count)
    agree = [s > 0 for s in signed]
    merged = sum_in_order([torch.where(a, x, 0.0) for a, x in zip(agree, weighted)])
    if normalize:
        divisor = sum_in_order([torch.where(a, weights[t], 0.0) for t, a in enumerate(agree)])
        merged = merged / torch.where(divisor == 0, 1.0, divisor)
    out = (base.float() + lam * merged).to(out_dtype)
    return (out, vote_counts(kept, [s < 0 for s in signed], agree)) if counted else out


def ties_vote_counts(base, experts, thr, cut, weights, *, sign_by_count: bool):
    """(#γ > 0, #γ < 0) over a chunk before any zero-sign fill, for the majority sign."""
    gamma = vote(trimmed_weighted(base, experts, thr, cut, weights), sign_by_count)
    return (gamma > 0).sum(), (gamma < 0).sum()


def majority_sign(sign_sum: int) -> float:
    """The paper's fallback for γ = 0: the sign of Σγ over the scope (+1 when that is 0 too)."""
    return -1.0 if sign_sum < 0 else 1.0


def tied_mask(base, experts, thr):
    """[T, N] bool: |τ_t| equals expert t's threshold."""
    return (experts.float() - base.float()).abs() == thr.view(-1, 1)


TIE_BLOCK = 4096  # elements per block of the tie counts: a quota's cut is then found inside one block


def tied_block_counts(base, experts, thr):
    """[T, ⌊N / TIE_BLOCK⌋ + 1] int64: per expert, the threshold ties (``tied_mask``) in each block
    of TIE_BLOCK elements, the last entry counting the short tail (often 0). One fused reduction:
    the [T, N] mask itself is never stored."""
    tied = tied_mask(base, experts, thr)
    whole = tied.shape[1] // TIE_BLOCK * TIE_BLOCK
    blocks = tied[:, :whole].reshape(tied.shape[0], -1, TIE_BLOCK).sum(2)
    return torch.cat([blocks, tied[:, whole:].sum(1, keepdim=True)], 1)


def tie_cut(block_counts: torch.Tensor, rule: TrimRule, ties_before: int, block_mask) -> tuple[int, int]:
    """The ``cut`` index for one expert's chunk and the number of threshold ties in it.

    ``block_counts`` is that expert's row of ``tied_block_counts``; ``block_mask(b)`` gives the
    tie mask of block b. A tie quota keeps the first ``tie_quota - ties_before`` ties of this
    chunk in index order."""
    n_tied = int(block_counts.sum())
    remaining = rule.tie_quota - ties_before
    if remaining <= 0:
        return -1, n_tied
    if remaining >= n_tied:
        return ALL_TIES, n_tied
    cumulative = block_counts.cumsum(0)
    block = int(torch.searchsorted(cumulative, torch.tensor(remaining, dtype=cumulative.dtype,
                                                            device=cumulative.device)))
    before = int(cumulative[block - 1]) if block else 0
    inside = block_mask(block).nonzero()
    return block * TIE_BLOCK + int(inside[remaining - before - 1, 0]), n_tied
