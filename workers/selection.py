"""Exact order statistics of |x| without sorting, by histograms over float32 bit patterns.

For non-negative float32 values the int32 bit patterns order like the values, so the k-th
smallest |x| is found in two counting passes: a histogram of the high 16 bits locates the bucket
holding the k-th value, and a histogram of the low 16 bits inside that bucket pins it exactly.
Histograms add up, so the passes can run over row chunks of one tensor or over shards of a whole
model, and the result is the very float that ``kthvalue`` on the flattened values would return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HIGH_BUCKETS = 1 << 15  # high 16 bits of a non-negative float32 (the sign bit is 0)
LOW_BUCKETS = 1 << 16


def _magnitude_bits(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return (experts.float() - base.float()).abs().view(torch.int32)


def high_bucket_ids(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Per element of τ = experts − base ([T, N]), its high-16-bit bucket of |τ|, offset by
    t·HIGH_BUCKETS so one bincount histograms every expert (see ``count_ids``)."""
    offset = torch.arange(experts.shape[0], device=experts.device, dtype=torch.int32).view(-1, 1) * HIGH_BUCKETS
    return (_magnitude_bits(base, experts) >> 16) + offset


def low_bucket_ids(base: torch.Tensor, experts: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """Per element, the low 16 bits of |τ| when its high bits equal expert t's ``buckets[t]``,
    else a sentinel (LOW_BUCKETS); offset by t·(LOW_BUCKETS + 1)."""
    bits = _magnitude_bits(base, experts)
    offset = torch.arange(experts.shape[0], device=experts.device, dtype=torch.int32).view(-1, 1) * (LOW_BUCKETS + 1)
    inside = (bits >> 16) == buckets.view(-1, 1)
    return torch.where(inside, bits & 0xFFFF, LOW_BUCKETS) + offset


def count_ids(ids: torch.Tensor, width: int) -> torch.Tensor:
    """[T, width] int64 histograms from the offset ids of ``high_bucket_ids`` / ``low_bucket_ids``."""
    n_experts = ids.shape[0]
    return torch.bincount(ids.reshape(-1), minlength=n_experts * width).view(n_experts, width)


def locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th smallest element (1-based) and k's rank inside that bucket."""
    cumulative = torch.cumsum(hist, 0)
    total = int(cumulative[-1])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    bucket = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=cumulative.dtype)))
    before = int(cumulative[bucket - 1]) if bucket else 0
    return bucket, k - before


@dataclass(frozen=True)
class OrderStatistic:
    """The k-th smallest value and how many elements lie below, at and above it."""

    value: float
    n_below: int
    n_equal: int
    n_above: int


def resolve(high: torch.Tensor, bucket: int, low: torch.Tensor, k: int) -> OrderStatistic:
    """Finish a selection: the exact k-th smallest value from both histograms."""
    _, rank_in_bucket = locate(high, k)
    low_value, _ = locate(low, rank_in_bucket)
    bits = (bucket << 16) | low_value
    value = torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
    total = int(high.sum())
    n_below = int(high[:bucket].sum()) + int(low[:low_value].sum())
    n_equal = int(low[low_value])
    return OrderStatistic(value, n_below, n_equal, total - n_below - n_equal)


@dataclass(frozen=True)
class TrimRule:
    """Which |τ| survive trimming: all |τ| > threshold, and of those equal to it the first
    ``tie_quota`` in flat index order (``None``: every tied value is kept)."""

    threshold: float
    tie_quota: int | None

    @classmethod
    def keep_all(cls) -> "TrimRule":
        return cls(0.0, None)

    @classmethod
    def keep_none(cls) -> "TrimRule":
        return cls(math.inf, 0)


def top_n_rule(high: torch.Tensor, bucket: int, low: torch.Tensor, n_keep: int) -> TrimRule:
    """Keep exactly the ``n_keep`` largest values, ties broken by lowest index (mergekit's trim)."""
    total = int(high.sum())
    stat = resolve(high, bucket, low, total - n_keep + 1)
    quota = n_keep - stat.n_above
    return TrimRule(stat.value, None if quota >= stat.n_equal else quota)


def top_n_k(numel: int, density: float) -> int | None:
    """The 1-based rank k to select for a per-tensor trim, or None when no selection is needed."""
    n_keep = int(density * numel)
    return None if n_keep in (0, numel) or numel == 0 else numel - n_keep + 1


def trivial_top_n_rule(numel: int, density: float) -> TrimRule:
    """The rule when ``top_n_k`` says no selection is needed (keep all or keep none)."""
    return TrimRule.keep_none() if int(density * numel) == 0 and numel else TrimRule.keep_all()
