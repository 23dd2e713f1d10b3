"""Linear (weighted average) and task-arithmetic kernels over one flat chunk: tensors in, tensor out.

Inputs are stacked [T, N] in any float dtype and computed in float32 in one pass (fusable by
torch.compile, see workers/compiled.py); sums run in model order.
"""

from __future__ import annotations

import torch

from workers.kernels.diagnostics import vote_counts
from workers.kernels.ties import sum_in_order


def task_arithmetic_merge(base, experts, weights, lam, divisor, *, out_dtype: torch.dtype, counted: bool = False):
    """θ₀ + λ·(Σ w_t τ_t / divisor); divisor = Σw when normalizing, else 1 (0-d float32 tensors).
    ``counted``: (θ, ``vote_counts`` of the chunk): nothing trimmed, no sign elected, an expert
    contributing where w_t·τ_t ≠ 0."""
    b = base.float()
    taus = [experts[t].float() - b for t in range(experts.shape[0])]
    weighted = [tau * weights[t] for t, tau in enumerate(taus)]
    out = (b + lam * (sum_in_order(weighted) / divisor)).to(out_dtype)
    return (out, vote_counts(taus, None, [x != 0 for x in weighted])) if counted else out


def linear_merge(models, weights, divisor, *, out_dtype: torch.dtype):
    """Σ w_t θ_t / divisor; divisor = Σw when normalizing, else 1."""
    return (sum_in_order([models[t].float() * weights[t] for t in range(models.shape[0])]) / divisor).to(out_dtype)
