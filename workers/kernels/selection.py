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
SENTINEL_BINS = 256  # bins after LOW_BUCKETS that elements outside the located bucket are spread over


def _magnitude_bits(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return (experts.float() - base.float()).abs().view(torch.int32)


def high_bucket_ids(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, N] int16: per element of τ = experts − base, the high 16 bits of |τ| (its bucket; the sign
    bit is 0, so 0 … HIGH_BUCKETS − 1). Two bytes per id make the counting pass cheaper."""
    return (_magnitude_bits(base, experts) >> 16).to(torch.int16)


def low_bucket_ids(base: torch.Tensor, experts: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """[T, N] int32: per element, the low 16 bits of |τ| when its high bits equal expert t's
    ``buckets[t]``, else one of SENTINEL_BINS sentinels from LOW_BUCKETS up, picked by the
    element's index. Most elements lie outside the bucket: counted into one bin, each increment
    would wait for the last (a bincount 2.6× slower)."""
    bits = _magnitude_bits(base, experts)
    inside = (bits >> 16) == buckets.view(-1, 1)
    index = torch.arange(bits.shape[1], device=bits.device, dtype=torch.int32)
    return torch.where(inside, bits & 0xFFFF, LOW_BUCKETS + (index & (SENTINEL_BINS - 1)))


def count_ids(ids: torch.Tensor, width: int) -> torch.Tensor:
    """[T, width] int64 histograms of the rows of ``high_bucket_ids`` / ``low_bucket_ids``
    (sentinels left out)."""
    return torch.stack([torch.bincount(row, minlength=width + SENTINEL_BINS)[:width] for row in ids])


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


def keep_count(numel: int, density: float) -> int:
    """How many |τ| a per-tensor trim keeps, as mergekit 0.1.5 counts: every element at density ≥ 1,
    else max(1, int(density·numel)) (a positive density keeps at least one), 0 of an empty tensor."""
    if numel == 0:
        return 0
    return numel if density >= 1 else max(1, int(density * numel))


def top_n_k(numel: int, density: float) -> int | None:
    """The 1-based rank k to select for a per-tensor trim, or None when everything is kept."""
    n_keep = keep_count(numel, density)
    return None if n_keep == numel else numel - n_keep + 1
