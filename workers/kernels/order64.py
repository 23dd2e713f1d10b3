"""Exact order statistics of float64 values over a tensor's row chunks, without sorting.

The float64 twin of workers/kernels/selection.py (which handles |τ| in float32): each value's bit
pattern is mapped to an int64 key that orders like the value (negative values too; −0.0 sorts just
below +0.0), and the k-th smallest key is found 16 bits at a time, most significant first: four
counting passes over the chunks, each a 65,536-bin histogram of the next 16 bits among the values
whose higher bits equal the prefix found so far. Histograms add up, so the result is the very
value ``kthvalue`` over the whole flattened tensor returns, for any chunking. Several ranks are
found in the same passes (arcee_fusion's three quartiles).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.kernels import selection

DIGIT_BITS = 16
WIDTH = 1 << DIGIT_BITS
SENTINEL_BINS = 256  # bins after WIDTH that values outside a prefix are spread over (see selection.low_bucket_ids)
SHIFTS = (48, 32, 16, 0)
INT64_MAX = (1 << 63) - 1


def sortable_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys of float64 values that order like the values: a non-negative value's bits as they
    are, a negative value's with the 63 low bits flipped (larger magnitude, smaller key)."""
    bits = values.contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ INT64_MAX, bits)


def key_to_value(key: int) -> float:
    bits = key if key >= 0 else key ^ INT64_MAX
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def value_to_key(value: float) -> int:
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits if bits >= 0 else bits ^ INT64_MAX


def _digit_counts(keys: torch.Tensor, shift: int, prefix: int | None) -> torch.Tensor:
    """[WIDTH] counts of the 16-bit digit at ``shift`` among keys whose bits above it equal ``prefix``
    (None: the top digit of every key, offset so that negative keys count from bin 0)."""
    if prefix is None:
        digits = (keys >> shift) + (WIDTH // 2)
    else:
        inside = (keys >> (shift + DIGIT_BITS)) == prefix
        spread = WIDTH + (torch.arange(keys.numel(), device=keys.device) & (SENTINEL_BINS - 1))
        digits = torch.where(inside, (keys >> shift) & (WIDTH - 1), spread)
    return torch.bincount(digits, minlength=WIDTH + SENTINEL_BINS)[:WIDTH]


@dataclass(frozen=True)
class Rank:
    """The k-th smallest value (1-based k) and how many values lie below and at it."""

    value: float
    key: int
    n_below: int
    n_equal: int


def kth_smallest(chunks: Callable[[], Sequence[torch.Tensor] | object], ks: Sequence[int]) -> list[Rank]:
    """The ``ks``-th smallest values (1-based) of the values ``chunks()`` yields, float64 tensors in
    flat order; ``chunks`` is called once per counting pass and must yield the same values each time."""
    if not ks:
        return []
    prefixes: list[int | None] = [None] * len(ks)
    ranks, below, equal = list(ks), [0] * len(ks), [0] * len(ks)
    total = None
    for shift in SHIFTS:
        wanted = sorted({p for p in prefixes}, key=lambda p: -1 << 64 if p is None else p)
        counts: dict = {}
        for values in chunks():
            keys = sortable_keys(values.reshape(-1))
            for p in wanted:
                c = _digit_counts(keys, shift, p)
                counts[p] = c if p not in counts else counts[p] + c
        counts = {p: c.cpu() for p, c in counts.items()}
        if total is None:
            total = int(counts[None].sum()) if None in counts else 0
            for k in ks:
                if not 1 <= k <= total:
                    raise ValueError(f"rank {k} outside 1..{total}")
        for j, p in enumerate(prefixes):
            hist = counts[p]
            digit, ranks[j] = selection.locate(hist, ranks[j])
            below[j] += int(hist[:digit].sum())
            equal[j] = int(hist[digit])
            prefixes[j] = (digit - WIDTH // 2 if p is None else p * WIDTH + digit)
    return [Rank(key_to_value(key), key, b, e) for key, b, e in zip(prefixes, below, equal)]


@dataclass(frozen=True)
class TopRule:
    """Which values survive a top-n selection: all keys > ``key``, and of those equal to it the first
    ``tie_quota`` in flat index order (None: all of them)."""

    key: int
    tie_quota: int | None

    @property
    def value(self) -> float:
        return key_to_value(self.key)


def top_n_rule(chunks, numel: int, n_keep: int) -> TopRule | None:
    """The rule keeping exactly the ``n_keep`` largest values, ties by lowest flat index;
    None when every value is kept (n_keep ≥ numel)."""
    if n_keep >= numel:
        return None
    if n_keep <= 0:
        return TopRule(INT64_MAX, 0)  # above every key: nothing kept
    rank = kth_smallest(chunks, [numel - n_keep + 1])[0]
    n_above = numel - rank.n_below - rank.n_equal
    quota = n_keep - n_above
    return TopRule(rank.key, None if quota >= rank.n_equal else quota)


class TopCut:
    """Applies a ``TopRule`` chunk by chunk, in flat order, carrying the tie count across chunks."""

    def __init__(self, rule: TopRule | None):
        self.rule, self._ties_before = rule, 0

    def keep(self, values: torch.Tensor) -> torch.Tensor | None:
        """Bool mask of the kept values of this chunk (None: all kept)."""
        if self.rule is None:
            return None
        keys = sortable_keys(values)
        kept = keys > self.rule.key
        if self.rule.tie_quota is not None:
            tied = keys == self.rule.key
            order = torch.cumsum(tied, 0) + self._ties_before
            self._ties_before += int(tied.sum())
            kept |= tied & (order <= self.rule.tie_quota)
        else:
            kept |= keys == self.rule.key
        return kept
