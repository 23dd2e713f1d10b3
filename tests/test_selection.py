"""Exact order statistics from float-bit histograms, and the per-tensor top-n trim, against plain references.

The references here are written from docs/algorithms.md: the k-th value is ``torch.kthvalue`` of the flattened
|x|; a per-tensor trim keeps exactly n_keep = int(density · numel) largest |τ|, ties at the
threshold broken by lowest flat index, i.e. the first n_keep entries of a stable sort by (−|τ|, index).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import trim_reference
from workers.kernels import selection, ties
from workers.kernels.selection import TrimRule

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values that stress the bit-pattern ordering: signed zeros, the smallest and largest denormals,
# the smallest normal, values around 1, the largest finite float32 and infinity
SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38, -1.1754944e-38, 1.0, -1.0,
                    1.0000001, 0.99999994, 3.4028235e38, -3.4028235e38, np.inf, -np.inf, 2.0, 0.5], dtype=np.float32)


@st.composite
def float32_vectors(draw, max_size: int = 5000, allow_infinity: bool = True) -> np.ndarray:
    """float32 vectors of 1..max_size elements with many ties, zeros, denormals and huge values.

    Values come from a small pool (so ties are common) built from special values, random bit
    patterns over the whole finite range (denormals and huge values included) and ordinary normals.
    """
    size = draw(st.integers(1, max_size))
    pool_size = draw(st.integers(1, max(1, min(size, draw(st.sampled_from([1, 3, 20, 500, 5000]))))))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, size=pool_size, dtype=np.uint64).astype(np.uint32)
    bits &= np.uint32(0xFF7FFFFF)  # exponent below 255: finite, never NaN
    pool = np.concatenate([bits.view(np.float32), SPECIAL, rng.standard_normal(pool_size).astype(np.float32)])
    if not allow_infinity:
        pool = pool[np.isfinite(pool)]
    kinds = draw(st.sampled_from(["pool", "normal", "denormal", "zeros"]))
    if kinds == "normal":
        pool = rng.standard_normal(pool_size).astype(np.float32)
    elif kinds == "denormal":
        pool = (rng.integers(-50, 50, size=pool_size) * np.float32(1e-45)).astype(np.float32)
    elif kinds == "zeros":
        pool = np.array([0.0, -0.0, 1.0], dtype=np.float32)
    values = rng.choice(pool, size=size)
    return values.astype(np.float32)


small_float32_vectors = hnp.arrays(
    np.float32, st.integers(1, 60),
    elements=st.one_of(st.floats(width=32, allow_nan=False), st.sampled_from([0.0, -0.0, 1e-45, 1.0, -1.0])))


def _chunks(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, n, *(c % (n + 1) for c in cuts)})
    return list(zip(points[:-1], points[1:])) or [(0, 0)]


def high_counts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Pass 1 as the shard task runs it: [T, HIGH_BUCKETS] counts of |τ|'s high bits over every part
    (parts are [T, n] row chunks of the experts' τ; the base is 0, so τ is the value itself)."""
    total = 0
    for p in parts:
        ids = selection.high_bucket_ids(torch.zeros(p.shape[1]), p)
        total = total + selection.count_ids(ids, selection.HIGH_BUCKETS)
    return total


def low_counts(parts: list[torch.Tensor], buckets: list[int]) -> torch.Tensor:
    """Pass 2: [T, LOW_BUCKETS] counts of the low bits inside each expert's bucket (sentinels dropped)."""
    total = 0
    for p in parts:
        ids = selection.low_bucket_ids(torch.zeros(p.shape[1]), p, torch.tensor(buckets, dtype=torch.int32))
        total = total + selection.count_ids(ids, selection.LOW_BUCKETS)
    return total


def _select(parts: list[torch.Tensor], ks: list[int]) -> list[selection.OrderStatistic]:
    """Both counting passes over the parts, then ``resolve`` per expert."""
    high = high_counts(parts)
    buckets = [selection.locate(high[t], k)[0] for t, k in enumerate(ks)]
    low = low_counts(parts, buckets)
    return [selection.resolve(high[t], buckets[t], low[t], k) for t, k in enumerate(ks)]


def _check_kth(x: np.ndarray, k: int, cuts: list[int], n_experts: int = 1) -> None:
    """Row t of the stacked experts is x rolled by t, each asked for its own k (k, k−1, ...)."""
    flat = torch.from_numpy(x.copy())
    n = flat.numel()
    stacked = torch.stack([flat.roll(t) if t % 2 == 0 else -flat.flip(0) for t in range(n_experts)])
    ks = [max(1, k - t) for t in range(n_experts)]
    parts = [stacked[:, a:b] for a, b in _chunks(n, cuts)]
    for t, (stat, kt) in enumerate(zip(_select(parts, ks), ks)):
        mags = stacked[t].abs()
        expected = torch.kthvalue(mags, kt).values
        got = torch.tensor(stat.value, dtype=torch.float32)
        # the same float, bit for bit (|x| has no negative zero, so the bits are unique)
        assert got.view(torch.int32).item() == expected.view(torch.int32).item(), (t, stat, expected)
        assert stat.n_below == int((mags < expected).sum())
        assert stat.n_equal == int((mags == expected).sum())
        assert stat.n_above == int((mags > expected).sum())
        assert stat.n_below < kt <= stat.n_below + stat.n_equal


@SETTINGS
@given(x=float32_vectors(), k_frac=st.floats(0, 1), cuts=st.lists(st.integers(0, 5000), max_size=6),
       n_experts=st.integers(1, 3))
def test_selection_equals_kthvalue(x, k_frac, cuts, n_experts):
    k = min(len(x), 1 + int(k_frac * len(x)))
    _check_kth(x, k, cuts, n_experts)


@SETTINGS
@given(x=small_float32_vectors, data=st.data())
def test_selection_equals_kthvalue_small(x, data):
    k = data.draw(st.integers(1, len(x)))
    cuts = data.draw(st.lists(st.integers(0, len(x)), max_size=4))
    _check_kth(x, k, cuts)


@pytest.mark.parametrize("k", [1, 2, 999, 1000])
def test_selection_extremes_of_k(k):
    x = np.random.default_rng(k).standard_normal(1000).astype(np.float32)
    _check_kth(x, k, [17, 500, 501], n_experts=2)


def test_locate_rejects_k_out_of_range():
    hist = high_counts([torch.ones(1, 5)])[0]
    for k in (0, 6):
        with pytest.raises(ValueError, match="outside 1..5"):
            selection.locate(hist, k)


def test_bucket_ids_order_like_magnitudes():
    x = torch.tensor([-0.0, 0.0, 1e-45, -3e-39, 1.0, -2.0, 3e38, float("inf")])
    ids = selection.high_bucket_ids(torch.zeros(8), torch.stack([x, x]))
    assert ids.shape == (2, 8)
    assert (ids[0] >= 0).all() and (ids[0].long() < selection.HIGH_BUCKETS).all()
    assert ids.dtype == torch.int16 and torch.equal(ids[1], ids[0])
    bits = x.abs().view(torch.int32)
    assert torch.equal(ids[0].long(), (bits >> 16).long())
    low = selection.low_bucket_ids(torch.zeros(8), torch.stack([x]), torch.tensor([0x3F80], dtype=torch.int32))
    sentinels = [selection.LOW_BUCKETS + i for i in range(8)]  # spread by element index
    assert low[0].tolist() == sentinels[:4] + [0] + sentinels[5:]  # only 1.0 is in 0x3F80


# ---- top-n trim ------------------------------------------------------------------------------

def implementation_rule(tau: torch.Tensor, density: float, row_chunks: list[tuple[int, int]]) -> TrimRule:
    """The rule as the shard task derives it: histograms accumulated chunk by chunk."""
    numel = tau.numel()
    k = selection.top_n_k(numel, density)
    if k is None:
        return TrimRule.keep_all()
    parts = [tau[a:b].reshape(1, -1) for a, b in row_chunks]
    high = high_counts(parts)[0]
    bucket, _ = selection.locate(high, k)
    low = low_counts(parts, [bucket])[0]
    return selection.top_n_rule(high, bucket, low, selection.keep_count(numel, density))


def trim_chunk(chunk: torch.Tensor, rule: TrimRule, ties_before: int) -> tuple[torch.Tensor, int]:
    """One row chunk trimmed by the TIES kernel (``tied_block_counts`` + ``tie_cut`` + ``trimmed_weighted`` with
    weight 1 over a zero base); returns it and the threshold ties it held."""
    flat = chunk.reshape(1, -1)
    base = torch.zeros(flat.shape[1])
    thr = torch.tensor([rule.threshold])
    if rule.tie_quota is None:
        cut, n_tied = ties.ALL_TIES, 0
    else:
        mask = ties.tied_mask(base, flat, thr)[0]
        counts = ties.tied_block_counts(base, flat, thr)[0]
        cut, n_tied = ties.tie_cut(counts, rule, ties_before,
                                   lambda b: mask[b * ties.TIE_BLOCK:(b + 1) * ties.TIE_BLOCK])
    (out,) = ties.trimmed_weighted(base, flat, thr, torch.tensor([cut]), torch.tensor([1.0]))
    return out.reshape(chunk.shape), n_tied


def trim_in_chunks(tau: torch.Tensor, rule: TrimRule, row_chunks: list[tuple[int, int]]) -> torch.Tensor:
    """Trim row chunk by row chunk, carrying the running count of threshold ties."""
    out = tau.clone()
    seen = 0
    for a, b in row_chunks:
        out[a:b], n_tied = trim_chunk(tau[a:b], rule, seen)
        seen += n_tied
    return out


def _check_trim(tau: torch.Tensor, density: float, row_chunks) -> None:
    rule = implementation_rule(tau, density, row_chunks)
    got = trim_in_chunks(tau, rule, row_chunks)
    expected = trim_reference(tau, density)
    assert torch.equal(got, expected), (rule, (got != expected).nonzero()[:5])
    n_keep = selection.keep_count(tau.numel(), density)
    n_nonzero = int((tau != 0).sum())
    assert int((got != 0).sum()) == min(n_keep, n_nonzero)


@st.composite
def tau_matrices(draw):
    rows = draw(st.integers(1, 60))
    cols = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    levels = draw(st.sampled_from([1, 2, 5, 50, 10**6]))
    if levels == 10**6:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
    else:  # few distinct magnitudes, both signs, some zeros: ties everywhere
        values = (rng.integers(-levels, levels + 1, size=(rows, cols)) / 8).astype(np.float32)
    return torch.from_numpy(values)


@SETTINGS
@given(tau=tau_matrices(), density=st.floats(0.001, 1.0), chunk=st.integers(1, 64))
def test_top_n_trim_matches_stable_sort(tau, density, chunk):
    rows = tau.shape[0]
    row_chunks = [(r, min(rows, r + chunk)) for r in range(0, rows, chunk)]
    _check_trim(tau, density, row_chunks)


def test_top_n_trim_ties_at_threshold_keep_lowest_indices_across_chunks():
    # 12 equal magnitudes with both signs, 4 larger values; n_keep = 8 keeps the 4 large values and
    # the first 4 tied ones in flat order, which fall in two different row chunks
    tau = torch.tensor([[0.5, -0.5, 0.0, 0.5], [2.0, 0.5, -0.5, 0.5], [0.5, -3.0, 0.5, 0.5],
                        [-0.5, 0.5, 4.0, 1.0]])
    density = 0.5
    for chunk in (1, 2, 3, 4):
        row_chunks = [(r, min(4, r + chunk)) for r in range(0, 4, chunk)]
        _check_trim(tau, density, row_chunks)
    got = trim_in_chunks(tau, implementation_rule(tau, density, [(0, 1), (1, 2), (2, 3), (3, 4)]),
                         [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert got.reshape(-1).tolist() == [0.5, -0.5, 0.0, 0.5, 2.0, 0.5, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0,
                                        0.0, 0.0, 4.0, 1.0]


@pytest.mark.parametrize("numel, density, expected", [
    (10, 1.0, None), (10, 0.05, 10), (10, 0.1, 10), (10, 0.5, 6), (7, 0.999, 2), (0, 0.5, None), (1, 0.3, None)])
def test_top_n_k(numel, density, expected):
    """mergekit 0.1.5's count: a positive density keeps at least one element (0.05 of 10: one)."""
    assert selection.top_n_k(numel, density) == expected


@pytest.mark.parametrize("numel, density, expected", [(10, 1.0, 10), (10, 0.05, 1), (10, 0.39, 3), (0, 0.5, 0)])
def test_keep_count(numel, density, expected):
    assert selection.keep_count(numel, density) == expected


def test_keep_all_rule_and_the_one_element_floor():
    tau = torch.tensor([[1.0, -2.0], [0.0, 3e38]])
    assert torch.equal(trim_in_chunks(tau, TrimRule.keep_all(), [(0, 2)]), tau)
    one = trim_in_chunks(tau, implementation_rule(tau, 0.2, [(0, 1), (1, 2)]), [(0, 1), (1, 2)])
    assert torch.equal(one, torch.tensor([[0.0, 0.0], [0.0, 3e38]]))  # int(0.2·4) = 0, but one is kept


# ---- bracketed selection (one pass, workers/kernels/selection.py BracketedSelection) --------------

def _bracketed(parts: list[tuple[torch.Tensor, torch.Tensor]], n_keep: list[int], numel: int, row_elements: int):
    """The shard's one-pass selection over row chunks (base, experts), eager: the rules, or None."""
    ks = [None if n >= numel else numel - n + 1 for n in n_keep]
    selected = selection.BracketedSelection(ks, numel, row_elements, lambda kernel, *a, numel: kernel(*a))
    for base, experts in parts:
        if not selected.add(base, experts, torch.empty(base.numel(), dtype=torch.int32)):
            return None
    return selected.rules(n_keep)


def _check_rule(got: TrimRule, mags: torch.Tensor, n_keep: int) -> None:
    """``got`` keeps exactly the n_keep largest of ``mags`` (ties by lowest index); its ``tie_cut``,
    when known, is the index of the last tie kept."""
    if n_keep >= mags.numel():
        assert got == TrimRule.keep_all()
        return
    value = torch.kthvalue(mags, mags.numel() - n_keep + 1).values
    n_above, tied_at = int((mags > value).sum()), (mags == value).nonzero().squeeze(1)
    quota = n_keep - n_above
    expected = TrimRule(value.item(), None) if quota >= tied_at.numel() else TrimRule(value.item(), quota,
                                                                                   int(tied_at[quota - 1]))
    assert (got.threshold, got.tie_quota) == (expected.threshold, expected.tie_quota)
    assert got.tie_cut in (None, expected.tie_cut)


@SETTINGS
@given(x=float32_vectors(allow_infinity=False), base_x=float32_vectors(allow_infinity=False), keep_frac=st.floats(0, 1),
       cuts=st.lists(st.integers(0, 5000), max_size=4), n_experts=st.integers(1, 3),
       sample=st.sampled_from([2, 16, 64, 1 << 16]))
def test_bracketed_selection_equals_kthvalue_or_gives_up(x, base_x, keep_frac, cuts, n_experts, sample):
    """Any sample size (a small one misses often): the exact rule for |θ_t − θ₀| (finite inputs, τ may
    overflow to ∞) or None, never another."""
    n = len(x)
    base = torch.from_numpy(np.resize(base_x, n).copy())
    flat = torch.from_numpy(x.copy())
    experts = torch.stack([flat.roll(t) for t in range(n_experts)])
    n_keep = [n if t == 1 else max(1, int(keep_frac * n) - t) for t in range(n_experts)]
    parts = [(base[a:b], experts[:, a:b]) for a, b in _chunks(n, cuts)]
    with mock.patch.object(selection, "BRACKET_SAMPLE", sample):
        rules = _bracketed(parts, n_keep, n, 1)
    if rules is not None:
        for t in range(n_experts):
            _check_rule(rules[t], (experts[t] - base).abs(), n_keep[t])


@pytest.mark.parametrize("kind", ["gaussian", "ties at the cut", "unchanged"])
def test_bracketed_selection_decides_bf16_tensors_in_one_pass(kind):
    """bf16 experts as the benchmarks make them, and two many-ties cases: one pass decides (no give-up),
    exactly, in one chunk or in row chunks; on the gaussian experts it also finds where the kept ties end."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 512, 640
    n = rows * cols
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    noise = {"gaussian": torch.randn(4, n, generator=g) * 0.005,
             "ties at the cut": torch.randint(-2, 3, (4, n), generator=g) * 0.25,
             "unchanged": torch.zeros(4, n)}[kind]
    experts = (base.float() + noise).to(torch.bfloat16)
    n_keep = [selection.keep_count(n, d) for d in (0.2, 0.5, 0.9, 1.0)]
    mags = (experts.float() - base.float()).abs()
    for step in (rows, 100):
        parts = [(base[r * cols:min(rows, r + step) * cols], experts[:, r * cols:min(rows, r + step) * cols])
                 for r in range(0, rows, step)]
        rules = _bracketed(parts, n_keep, n, cols)
        assert rules is not None, (kind, step)
        for t in range(4):
            _check_rule(rules[t], mags[t], n_keep[t])
        if kind == "gaussian":
            assert all(r.tie_cut is not None for r in rules if r.tie_quota is not None)
            assert any(r.tie_quota is not None for r in rules)


@SETTINGS
@given(x=float32_vectors(allow_infinity=False), n_experts=st.integers(1, 3), pick=st.integers(0, 10**6))
def test_low_counts_from_flagged_elements_equal_counting_every_id(x, n_experts, pick):
    """The refine pass's two ways (flag the buckets' elements, or an id for every element) count alike."""
    flat = torch.from_numpy(x.copy())
    experts = torch.stack([flat.roll(t) if t % 2 == 0 else -flat.flip(0) for t in range(n_experts)])
    base = torch.zeros(flat.numel())
    bits = experts.abs().view(torch.int32) >> 16
    buckets = [int(bits[t, pick % flat.numel()]) for t in range(n_experts)]
    buckets[-1] = -1 if n_experts > 1 else buckets[-1]  # an expert with nothing to refine
    expected = selection.count_ids(selection.low_bucket_ids(base, experts, torch.tensor(buckets, dtype=torch.int32)),
                                   selection.LOW_BUCKETS)
    flags = selection.bracket_flags(base, experts, *selection.bucket_brackets(buckets, base.device))
    _, flagged = selection.flagged_magnitudes(flags, base, experts, flat.numel())
    assert torch.equal(selection.low_counts_of_flagged(flagged, buckets), expected)
