"""mergekit's generalized task arithmetic, after sparsification, over one flat chunk (eager).

The weighted sparse task vectors w_t·τ̃_t are mixed with or without a sign consensus, divided by
the weights (``normalize``), scaled by λ and added to the base; float32 throughout, summed in
expert order. docs/algorithms.md §8.
"""

from __future__ import annotations

import torch

from workers.kernels.ties import sum_in_order

NO_CONSENSUS_EPS = 1e-8  # mergekit: without consensus, |Σw| below this divides by 1


def agreement(weighted: list[torch.Tensor], consensus: str | None) -> list[torch.Tensor] | None:
    """Per expert, where its w·τ̃ has the elected sign (None without consensus): the sign of
    Σ w·τ̃ (``sum``) or of Σ sign(w·τ̃) (``count``), ≥ 0 counting as +; a zero never agrees."""
    if consensus is None:
        return None
    votes = sum_in_order([torch.sign(x) for x in weighted] if consensus == "count" else weighted)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    return [torch.sign(x) == elected for x in weighted]


def mix(base: torch.Tensor, weighted: list[torch.Tensor], weights: list[float], agree: list[torch.Tensor] | None, *,
        normalize: bool, lam: float, out_dtype: torch.dtype) -> torch.Tensor:
    """θ₀ + λ·mix(w·τ̃). With a consensus (``agree`` of ``agreement``) only the w·τ̃ of the elected
    sign are summed, and ``normalize`` divides by the sum of their weights (1 where none).
    Without, everything is summed and ``normalize`` divides by Σw (1 when |Σw| < 1e-8)."""
    b = base.float()
    if agree is None:
        merged = sum_in_order(weighted)
        if normalize:
            divisor = sum(weights)
            merged = merged / (1.0 if abs(divisor) < NO_CONSENSUS_EPS else divisor)
    else:
        merged = sum_in_order([torch.where(a, x, 0.0) for a, x in zip(agree, weighted)])
        if normalize:
            divisor = sum_in_order([torch.where(a, w, 0.0) for a, w in zip(agree, weights)])
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
    if lam != 1:
        merged = merged * lam
    return (b + merged).to(out_dtype)
