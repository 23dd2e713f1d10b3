"""Linear (weighted average) and task-arithmetic kernels: float32 tensors in, tensor out, no I/O."""

from __future__ import annotations

import torch


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_t x_t, summed in input order."""
    total = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        total += x * w
    return total


def linear_chunk(models: list[torch.Tensor], *, weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_t θ_t, divided by Σ w_t when ``normalize``."""
    total = weighted_sum(models, weights)
    return total / sum(weights) if normalize else total


def task_arithmetic_chunk(base: torch.Tensor, taus: list[torch.Tensor], *, weights: list[float], lam: float, normalize: bool) -> torch.Tensor:
    """θ₀ + λ·Σ w_t τ_t (Σ w_t τ_t divided by Σ w_t when ``normalize``)."""
    total = weighted_sum(taus, weights)
    if normalize:
        total = total / sum(weights)
    return base + lam * total
