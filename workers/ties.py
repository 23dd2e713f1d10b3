"""TIES-Merging kernels (trim, elect sign, disjoint merge): float32 tensors in, tensors out, no I/O.

Every function works on a chunk of rows as well as on a whole tensor; the state that spans chunks
(how many threshold ties were kept so far) is passed in and returned explicitly.
"""

from __future__ import annotations

import torch

from workers.selection import TrimRule


def trim_(tau: torch.Tensor, rule: TrimRule, ties_before: int) -> int:
    """Zero, in place, the entries of ``tau`` the rule drops; returns the threshold ties seen in this chunk.

    ``ties_before`` counts |τ| == threshold entries in earlier chunks of the same tensor, so a
    tie quota keeps the lowest flat indices across chunks.
    """
    magnitude = tau.abs()
    if rule.tie_quota is None:
        tau.mul_(magnitude >= rule.threshold)
        return 0
    tied = magnitude == rule.threshold
    keep = magnitude > rule.threshold
    remaining = rule.tie_quota - ties_before
    if remaining > 0:
        tie_rank = torch.cumsum(tied.reshape(-1), 0)
        keep |= (tied.reshape(-1) & (tie_rank <= remaining)).view_as(keep)
    tau.mul_(keep)
    return int(tied.sum())


def elect(weighted: list[torch.Tensor], *, sign_method: str) -> torch.Tensor:
    """γ = sign(Σ w·τ) ("sum") or sign(Σ sign(w·τ)) ("count"), summed in expert order; zeros stay 0."""
    total = torch.zeros_like(weighted[0])
    for w_tau in weighted:
        total += w_tau if sign_method == "sum" else torch.sign(w_tau)
    return torch.sign(total)


def fill_zero_sign_(gamma: torch.Tensor, zero_sign: float) -> torch.Tensor:
    """Where the vote is 0, use ``zero_sign`` (+1 mergekit, or the majority sign of the scope)."""
    return gamma.masked_fill_(gamma == 0, zero_sign)


def disjoint_merge(weighted: list[torch.Tensor], weights: list[float], gamma: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """τ_m: Σ of the w·τ agreeing with γ, divided by Σ of their weights when ``normalize`` (0 where none agree)."""
    merged = torch.zeros_like(gamma)
    divisor = torch.zeros_like(gamma) if normalize else None
    for w_tau, w in zip(weighted, weights):
        agree = torch.sign(w_tau) == gamma
        merged += w_tau * agree
        if divisor is not None:
            divisor += agree * w
    if divisor is not None:
        merged /= divisor.masked_fill_(divisor == 0, 1.0)
    return merged


def ties_chunk(base: torch.Tensor, taus: list[torch.Tensor], *, weights: list[float], rules: list[TrimRule],
               ties_before: list[int], sign_method: str, zero_sign: float, lam: float, normalize: bool) -> tuple[torch.Tensor, list[int]]:
    """θ₀ + λ·τ_m for one chunk. ``taus`` are consumed (trimmed and weighted in place).

    Returns the merged chunk and the threshold ties seen per expert in this chunk.
    """
    weighted, ties = _trim_and_weight(taus, weights, rules, ties_before)
    gamma = fill_zero_sign_(elect(weighted, sign_method=sign_method), zero_sign)
    merged = disjoint_merge(weighted, weights, gamma, normalize=normalize)
    return base + lam * merged, ties


def elected_sign_sum(taus: list[torch.Tensor], *, weights: list[float], rules: list[TrimRule],
                     ties_before: list[int], sign_method: str) -> tuple[int, list[int]]:
    """Σ γ over a chunk (before any zero-sign fill), an exact integer; ``taus`` are consumed."""
    weighted, ties = _trim_and_weight(taus, weights, rules, ties_before)
    gamma = elect(weighted, sign_method=sign_method)
    return int((gamma > 0).sum()) - int((gamma < 0).sum()), ties


def majority_sign(sign_sum: int) -> float:
    """The paper's fallback for γ = 0: the sign of Σ γ over the scope (+1 when that is 0 too)."""
    return -1.0 if sign_sum < 0 else 1.0


def _trim_and_weight(taus, weights, rules, ties_before):
    ties = []
    for tau, w, rule, before in zip(taus, weights, rules, ties_before):
        ties.append(trim_(tau, rule, before))
        tau.mul_(w)
    return taus, ties
