"""Exact order statistics of |x| without sorting, by histograms over float32 bit patterns.

For non-negative float32 values the int32 bit patterns order like the values, so the k-th
smallest |x| is found in two counting passes: a histogram of the high 16 bits locates the bucket
holding the k-th value, and a histogram of the low 16 bits inside that bucket pins it exactly.
Histograms add up, so the passes can run over row chunks of one tensor or over shards of a whole
model, and the result is the very float that ``kthvalue`` on the flattened values would return.

A tensor's own trim usually needs one pass instead (``sample_bracket`` … ``bracketed_statistic``):
a strided sample of its first chunk brackets the k-th |τ| of each expert, one fused pass counts the
values below the bracket and flags the elements inside some expert's bracket, and the k-th value
is selected exactly among the flagged few. When the bracket misses the k-th value (rare: four
standard errors of the sample quantile either side) the histograms decide.
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
    ``tie_quota`` in flat index order (``None``: every tied value is kept). ``tie_cut``: the flat
    index of the last tie kept, when the selection saw where the ties lie (else the merge counts them)."""

    threshold: float
    tie_quota: int | None
    tie_cut: int | None = None

    @classmethod
    def keep_all(cls) -> "TrimRule":
        return cls(0.0, None)

    @classmethod
    def keep_none(cls) -> "TrimRule":
        return cls(math.inf, 0)


def top_n_rule(high: torch.Tensor, bucket: int, low: torch.Tensor, n_keep: int) -> TrimRule:
    """Keep exactly the ``n_keep`` largest values, ties broken by lowest index (mergekit's trim)."""
    return keep_rule(resolve(high, bucket, low, int(high.sum()) - n_keep + 1), n_keep)


def keep_rule(stat: OrderStatistic, n_keep: int, tied_at=None) -> TrimRule:
    """The rule keeping the ``n_keep`` largest values, given the (numel − n_keep + 1)-th smallest;
    ``tied_at`` (optional): the flat indices, ascending, of the values equal to it."""
    quota = n_keep - stat.n_above
    if quota >= stat.n_equal:
        return TrimRule(stat.value, None)
    return TrimRule(stat.value, quota, None if tied_at is None else int(tied_at[quota - 1]))


BRACKET_SAMPLE = 1 << 16  # |τ| sampled per expert to bracket its k-th value
BRACKET_SIGMAS = 4  # the bracket's half-width, in standard errors of the sample quantile
BRACKET_MIN_ELEMENTS = 1 << 18  # a smaller tensor is selected by the histograms (a bracket would hold much of it)


def sample_bracket(base, experts, ks: list[int | None], numel: int, row_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, float32 [lo, hi] that likely hold the k-th smallest |τ| of a tensor of ``numel``
    elements, from a strided sample of this chunk (the stride shares no factor with the row length,
    so every column is sampled). An expert with k None (nothing trimmed) gets an empty bracket."""
    n = base.numel()
    step = max(1, n // BRACKET_SAMPLE)
    while math.gcd(step, row_elements) != 1:
        step += 1
    sample = strided_magnitudes(base, experts, step).sort(1).values
    brackets = [(math.inf, -math.inf) if k is None else sample_quantile_bracket(sample[t], k, numel, BRACKET_SIGMAS)
                for t, k in enumerate(ks)]
    return tuple(torch.tensor(bounds, device=base.device) for bounds in zip(*brackets))


def strided_magnitudes(base, experts, step: int) -> torch.Tensor:
    """[T, ⌈N / step⌉] float32: every expert's |τ| at every ``step``-th element of the chunk."""
    return (experts[:, ::step].float() - base[::step].float()).abs()


def bracket_flags(base, experts, lo, hi) -> torch.Tensor:
    """[N] int32: 1 where some expert's |τ| lies in its [lo, hi] (a bracket of one value, lo = hi,
    flags nothing: its counts settle it), else 0. Built per expert and stored as int32: compiled,
    bool stores and reductions along a dimension of the [T, N] form ran 3-6x slower."""
    b = base.float()
    inside = None
    for t in range(experts.shape[0]):
        magnitude = (experts[t].float() - b).abs()
        flagged = (magnitude >= lo[t]) & (magnitude <= hi[t]) & (lo[t] < hi[t])
        inside = flagged if inside is None else inside | flagged
    return inside.to(torch.int32)


def bracket_scan(flags, base, experts, lo, hi) -> torch.Tensor:
    """One fused pass: ``flags`` := ``bracket_flags``; returns [2, T] int64, per expert the |τ|
    below lo and those at most hi (1-d reductions per expert)."""
    flags.copy_(bracket_flags(base, experts, lo, hi))
    b = base.float()
    magnitudes = [(experts[t].float() - b).abs() for t in range(experts.shape[0])]
    return torch.stack([torch.stack([(m < lo[t]).sum() for t, m in enumerate(magnitudes)]),
                        torch.stack([(m <= hi[t]).sum() for t, m in enumerate(magnitudes)])])


def flagged_magnitudes(flags, base, experts, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the U flagged indices, ascending; [T, U] float32: every expert's |τ| there, as the kernels
    compute it); None when more than ``limit`` are flagged."""
    index = flags.nonzero().squeeze(1)
    if index.numel() > limit:
        return None
    return index, (experts.index_select(1, index).float() - base.index_select(0, index).float()).abs()


def bucket_brackets(buckets: list[int], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per expert, the smallest and largest float32 of its high-bit bucket (an empty bracket for
    bucket −1); None when a bucket holds infinities or NaNs (no float bracket bounds it)."""
    if any(b >= 0x7F80 for b in buckets):
        return None
    bounds = torch.tensor([[b << 16, (b << 16) | 0xFFFF] if b >= 0 else [0x7F800000, 0] for b in buckets],
                          dtype=torch.int32).view(torch.float32)  # -1: [inf, 0], an empty bracket
    return bounds[:, 0].contiguous().to(device), bounds[:, 1].contiguous().to(device)


def low_counts_of_flagged(flagged: torch.Tensor, buckets: list[int]) -> torch.Tensor:
    """[T, LOW_BUCKETS] int64: per expert, the low 16 bits of its ``flagged`` |τ| inside its bucket
    counted (what ``count_ids(low_bucket_ids(...))`` counts, from the flagged elements alone)."""
    bits = flagged.view(torch.int32)
    return torch.stack([torch.bincount(bits[t][(bits[t] >> 16) == b] & 0xFFFF, minlength=LOW_BUCKETS)
                        for t, b in enumerate(buckets)])


def bracketed_statistic(flagged: torch.Tensor, below: int, at_most_hi: int, lo: float, hi: float, k: int,
                        numel: int) -> OrderStatistic | None:
    """The exact k-th smallest |τ| of the tensor from one expert's counts (``below`` lo,
    ``at_most_hi``) and its ``flagged`` |τ| (every element with |τ| in [lo, hi] when lo < hi);
    None when the bracket does not hold the k-th value."""
    def select(j: int) -> tuple[float, int, int]:
        inside = inside_bracket(flagged, lo, hi)  # ~1/T of the flagged: kthvalue over these is 2x faster
        value = inside.kthvalue(j).values
        return value.item(), int((inside < value).sum()), int((inside == value).sum())

    return _in_bracket(below, at_most_hi, lo, hi, k, numel, select)


def inside_bracket(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The ``values`` in [lo, hi]."""
    return values[(values >= lo) & (values <= hi)]


def _in_bracket(below: int, at_most_hi: int, lo: float, hi: float, k: int, numel: int, select) -> OrderStatistic | None:
    """The k-th smallest of ``numel`` values from the counts ``below`` lo and ``at_most_hi``, and
    ``select(j)``: (the j-th smallest value inside [lo, hi], how many inside are below it, how
    many equal it); None when the bracket does not hold the k-th value. A one-value bracket
    (lo = hi) is settled by its counts."""
    if not below < k <= at_most_hi:
        return None
    if lo == hi:
        return OrderStatistic(lo, below, at_most_hi - below, numel - at_most_hi)
    value, n_less, n_equal = select(k - below)
    n_below = below + n_less
    return OrderStatistic(value, n_below, n_equal, numel - n_below - n_equal)


def tally(values: torch.Tensor, counts: torch.Tensor, more: torch.Tensor, more_counts: torch.Tensor | None = None):
    """(distinct, counts): a tally of non-negative float32 values as int32 bits (ascending) with
    their counts, with the values ``more`` (int32 bits; ``more_counts`` of each, else one) added."""
    distinct, where = torch.unique(torch.cat([values, more]), return_inverse=True)
    if more_counts is None:
        more_counts = torch.ones(more.numel(), dtype=torch.int64, device=counts.device)
    return distinct, torch.zeros(distinct.numel(), dtype=torch.int64, device=counts.device).index_add_(
        0, where, torch.cat([counts, more_counts]))


def tallied_statistic(values: torch.Tensor, counts: torch.Tensor, below: int, at_most_hi: int, lo: float,
                      hi: float, k: int, numel: int) -> OrderStatistic | None:
    """``bracketed_statistic`` from a ``tally`` of the values inside [lo, hi] instead of the values."""
    def select(j: int) -> tuple[float, int, int]:
        cumulative = counts.cumsum(0)
        at = int(torch.searchsorted(cumulative, torch.tensor(j, dtype=cumulative.dtype)))
        return values[at:at + 1].view(torch.float32).item(), int(cumulative[at - 1]) if at else 0, int(counts[at])

    return _in_bracket(below, at_most_hi, lo, hi, k, numel, select)


def sample_quantile_bracket(sample: torch.Tensor, k: int, numel: int, sigmas: float) -> tuple[float, float]:
    """[lo, hi] around the k-th smallest of ``numel`` values, from a sorted ``sample`` of them:
    the sample's values ``sigmas`` standard errors of its quantile either side (lo = 0 and hi = ∞
    where that falls off the sample)."""
    m = sample.numel()
    p = (k - 0.5) / numel
    half = sigmas * math.sqrt(p * (1 - p) / m) + 1 / m
    first, last = math.floor((p - half) * m), math.ceil((p + half) * m)
    return (0.0 if first < 0 else float(sample[first])), (math.inf if last >= m else float(sample[last]))


class BracketedSelection:
    """Per expert, the exact trim rule of one tensor from a single pass over its chunks (``add``
    each in order, then ``rules``): a sample of the first chunk brackets each k-th |τ|, one fused
    scan per chunk counts and flags, the flagged |τ| and their indices are kept (the ties at the
    threshold are among them, so the rule knows its ``tie_cut``). It gives up (``add`` returns
    False, ``rules`` None) when more elements are flagged than one chunk holds (their |τ| would
    outgrow the memory the chunk's merge is planned with) or a bracket missed; the histograms
    decide then."""

    def __init__(self, ks: list[int | None], numel: int, row_elements: int, run):
        self.ks, self.numel, self.row_elements, self.run = ks, numel, row_elements, run  # run: Compiler.run
        self.lo = self.hi = self.limit = None
        self.counts, self.offset, self.index, self.flagged = 0, 0, [], []

    def add(self, base, experts, flags) -> bool:
        """Scan one chunk (``flags``: an [N] int32 buffer to use); False when too much is flagged."""
        if self.lo is None:
            self.lo, self.hi = sample_bracket(base, experts, self.ks, self.numel, self.row_elements)
            self.limit = base.numel()
        self.counts = self.counts + self.run(bracket_scan, flags, base, experts, self.lo, self.hi, numel=experts.numel())
        found = flagged_magnitudes(flags, base, experts, self.limit)
        if found is None:
            self.limit = -1
            return False
        self.index.append(found[0] + self.offset)
        self.flagged.append(found[1])
        self.limit -= found[0].numel()
        self.offset += base.numel()
        return True

    def rules(self, n_keep: list[int]) -> list[TrimRule] | None:
        """Per expert the rule keeping its ``n_keep`` largest |τ| (keep-all where k is None); None
        when a bracket missed."""
        if self.limit is None or self.limit < 0:
            return None
        index, flagged, (below, at_most_hi) = torch.cat(self.index), torch.cat(self.flagged, 1), self.counts.tolist()
        rules = []
        for t, (k, lo, hi) in enumerate(zip(self.ks, self.lo.tolist(), self.hi.tolist())):
            if k is None:
                rules.append(TrimRule.keep_all())
                continue
            stat = bracketed_statistic(flagged[t], below[t], at_most_hi[t], lo, hi, k, self.numel)
            if stat is None:
                return None
            tied_at = index[flagged[t] == stat.value] if lo < hi else None  # lo = hi: no element was flagged
            rules.append(keep_rule(stat, n_keep[t], tied_at))
        return rules


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
