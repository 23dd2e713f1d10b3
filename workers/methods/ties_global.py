"""TIES's model-wide trim (``trim_scope: global``, the paper's code): one threshold per expert over
the whole flattened model, found by scans over every shard, before the shards merge.

Pass 0 (sample): every shard reports |τ| at every stride-th element of a middle block of 1/256 of
each tensor's rows; the coordinator brackets, per expert, the k-th smallest |τ| of the model
(k = d − int(d·density), 1-based, as kthvalue on the flattened model) between two of the sample's
quantiles. Pass 1 (bracket): shards report, per expert, the |τ| below the bracket, those at most
its top, and the distinct values inside it with their counts, which pins the exact threshold.
When the bracket misses, two histogram passes decide as they do for one tensor: the high 16 bits
of |τ|'s float32 bits, then the low 16 bits inside the located bucket. Pass 3 (zero_sign
majority): shards report Σγ as exact integers. The coordinator only ever holds counts and the
sample.

Full reads of each input: 2 (threshold + merge) with zero_sign positive, 3 with majority, and
2 more when the bracket misses; the sample reads 1/256 of the rows. docs/algorithms.md §4.4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from workers.kernels import selection, ties
from workers.kernels.selection import TrimRule
from workers.methods.base import Prepass
from workers.methods.ties_passes import histograms, sign_sum
from workers.tensor_io import rows_of

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalTrim:
    """What every shard of a global-scope run merges with: one rule per expert and the zero sign."""

    rules: tuple[TrimRule, ...]
    zero_sign: float


SAMPLE_ROW_SHARE = 256  # the sample reads a middle block of 1/256 of each tensor's rows
SAMPLE_SIZE = 1 << 20  # about this many sampled |τ| per expert over the model
SAMPLE_SIGMAS = 6  # the bracket's half-width in standard errors (a block of rows is not a uniform sample)
# distinct |τ| a shard tallies per expert inside its bracket before it gives up (the histograms decide then):
# bf16 experts hold few distinct values, but float32 ones can hold one per element (12 B each, to the coordinator)
TALLY_LIMIT = 1 << 18


@dataclass(frozen=True)
class SampleScan:
    """Pass 0: per expert, |τ| at every ``stride``-th element of a middle block of each tensor's rows."""

    n_experts: int
    stride: int

    def initial(self) -> list:
        return [torch.zeros(self.n_experts, 0)]

    def accumulate(self, ctx, inputs, totals: list) -> list:
        rows = rows_of(inputs.task.shape)
        block = -(-rows // SAMPLE_ROW_SHARE)
        start = (rows - block) // 2
        base, experts = inputs.load_block((start, start + block))
        with ctx.timer.track("kernel"):
            sample = selection.strided_magnitudes(base, experts, self.stride)
        return [torch.cat([totals[0], sample.cpu()], 1)]


@dataclass(frozen=True)
class BracketScan:
    """Pass 1: per expert, the |τ| below its bracket's lo and at most its hi ([2, T]), whether the
    shard gave up (more than ``limit`` distinct values inside some bracket), then per expert the
    distinct values inside [lo, hi] (float32 bits) and their counts."""

    lo: tuple[float, ...]
    hi: tuple[float, ...]
    limit: int = TALLY_LIMIT

    def initial(self) -> list:
        empty = [torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)]
        return [torch.zeros(2, len(self.lo), dtype=torch.int64), False] + empty * len(self.lo)

    def accumulate(self, ctx, inputs, totals: list) -> list:
        counts, gave_up, tallies = totals[0], totals[1], totals[2:]
        if gave_up:  # the result is of no use: read nothing more
            return totals
        lo, hi = ctx.vector(self.lo), ctx.vector(self.hi)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                flags = ctx.buffer(("flags",), base.shape, torch.int32)
                counts = counts + ctx.compiler.run(selection.bracket_scan, flags, base, experts, lo, hi,
                                                   numel=experts.numel()).cpu()
                _, flagged = selection.flagged_magnitudes(flags, base, experts, base.numel())
                for t, (low, high) in enumerate(zip(self.lo, self.hi)):
                    inside = selection.inside_bracket(flagged[t], low, high).cpu().view(torch.int32)
                    tallies[2 * t], tallies[2 * t + 1] = selection.tally(tallies[2 * t], tallies[2 * t + 1], inside)
                if max(t.numel() for t in tallies[::2]) > self.limit:
                    return [counts, True, *self.initial()[2:]]
        return [counts, False, *tallies]


@dataclass(frozen=True)
class HighHistogramScan:
    """Pass 1: per expert, the high-16-bit histogram of |τ| over the shard."""

    n_experts: int

    def initial(self) -> list:
        return [torch.zeros(self.n_experts, selection.HIGH_BUCKETS, dtype=torch.int64)]

    def accumulate(self, ctx, inputs, totals: list) -> list:
        return [totals[0] + histograms(ctx, inputs, None).cpu()]


@dataclass(frozen=True)
class LowHistogramScan:
    """Pass 2: per expert, the low-16-bit histogram of |τ| inside that expert's threshold bucket."""

    buckets: tuple[int, ...]

    def initial(self) -> list:
        return [torch.zeros(len(self.buckets), selection.LOW_BUCKETS, dtype=torch.int64)]

    def accumulate(self, ctx, inputs, totals: list) -> list:
        return [totals[0] + histograms(ctx, inputs, list(self.buckets)).cpu()]


@dataclass(frozen=True)
class SignSumScan:
    """Pass 3 (zero_sign majority): Σγ over the shard's elements, an exact integer."""

    rules: tuple[TrimRule, ...]
    weights: tuple[float, ...]
    sign_by_count: bool

    def initial(self) -> list:
        return [0]

    def accumulate(self, ctx, inputs, totals: list) -> list:
        return [totals[0] + sign_sum(ctx, inputs, list(self.rules), ctx.vector(self.weights), self.sign_by_count)]


def global_k(d: int, density: float) -> int:
    """The paper's 1-based rank of the threshold: k = d − int(d·density) (0: keep everything)."""
    return d - int(d * density)


def global_trim(options, plan, run_scans, saved: dict | None) -> Prepass:
    """The model-wide rules (from ``saved`` when a resumed run found them already)."""
    if saved is None:
        saved = compute_global_trim(options, plan, run_scans)
    rules = tuple(TrimRule(r["threshold"], r["tie_quota"]) for r in saved["rules"])
    return Prepass(GlobalTrim(rules, saved["zero_sign"]), saved, {"global_trim": saved["record"]})


def compute_global_trim(options, plan, run_scans) -> dict:
    """Thresholds and zero sign for the whole model, as the JSON state ``global_trim`` reads."""
    scanned: list = []

    def scan(what):
        results = run_scans(what)
        scanned.extend(results)
        return results

    d = sum(math.prod(t.shape) for t in plan.tensors if t.action == "merge" and t.tied_to is None)
    ks = [global_k(d, density) for density in options.densities]
    stats = bracketed_statistics(scan, ks, d) if any(ks) else [None] * len(ks)
    full_reads = 1 if any(ks) else 0
    if any(stat is None and k > 0 for stat, k in zip(stats, ks)):
        stats, full_reads = histogram_statistics(scan, ks), full_reads + 2
    rules, records = [], []
    experts = [i for i in plan.inputs if i.role == "expert"]
    for t, (stat, k) in enumerate(zip(stats, ks)):
        rule, kept = (TrimRule.keep_all(), d) if k == 0 else (TrimRule(stat.value, None), stat.n_equal + stat.n_above)
        rules.append(rule)
        records.append({"expert": experts[t].url, "density": options.densities[t], "d": d, "k": k,
                        "threshold": rule.threshold, "kept": kept})
    zero_sign, total = 1.0, None
    if options.zero_sign == "majority":
        total = sum(int(r.values[0]) for r in scan(SignSumScan(tuple(rules), options.weights,
                                                               options.sign_method == "count")))
        zero_sign = ties.majority_sign(total)
        full_reads += 1
    record = {"trim_scope": "global", "experts": records, "elected_sign_sum": total, "zero_sign": zero_sign,
              "input_reads": full_reads + 1, "scan_bytes_read": sum(r.bytes_read for r in scanned)}
    LOG.info("global trim: d=%d thresholds=%s zero_sign=%+.0f", d, [r.threshold for r in rules], zero_sign)
    return {"rules": [{"threshold": r.threshold, "tie_quota": r.tie_quota} for r in rules], "zero_sign": zero_sign,
            "record": record}


def bracketed_statistics(scan, ks: list[int], d: int) -> list:
    """Per expert (k > 0) the k-th smallest |τ| of the model from the sample and one bracket pass;
    None where the bracket missed it (everywhere when a shard gave up)."""
    stride = max(1, d // SAMPLE_ROW_SHARE // SAMPLE_SIZE)
    sample = torch.cat([torch.from_numpy(np.array(r.values[0])) for r in scan(SampleScan(len(ks), stride))], 1)
    sample = sample.sort(1).values
    lo, hi = zip(*[selection.sample_quantile_bracket(sample[t], k, d, SAMPLE_SIGMAS) if k > 0 and sample.shape[1]
                   else (math.inf, -math.inf) for t, k in enumerate(ks)])
    found = scan(BracketScan(tuple(lo), tuple(hi), TALLY_LIMIT))
    if any(r.values[1] for r in found):
        return [None] * len(ks)
    below, at_most_hi = _sum_arrays(found)
    stats = []
    for t, k in enumerate(ks):
        if k == 0:
            stats.append(None)
            continue
        values, counts = torch.tensor([], dtype=torch.int32), torch.tensor([], dtype=torch.int64)
        for r in found:
            values, counts = selection.tally(values, counts, torch.from_numpy(np.array(r.values[2 + 2 * t])),
                                             torch.from_numpy(np.array(r.values[3 + 2 * t])))
        stats.append(selection.tallied_statistic(values, counts, int(below[t]), int(at_most_hi[t]), lo[t], hi[t], k, d))
    return stats


def histogram_statistics(scan, ks: list[int]) -> list:
    """Per expert (k > 0) the k-th smallest |τ| of the model from the two histogram passes."""
    highs = _sum_arrays(scan(HighHistogramScan(len(ks))))
    buckets = tuple(selection.locate(torch.from_numpy(h), k)[0] if k > 0 else -1 for h, k in zip(highs, ks))
    lows = _sum_arrays(scan(LowHistogramScan(buckets)))
    return [selection.resolve(torch.from_numpy(high), bucket, torch.from_numpy(low), k) if k > 0 else None
            for high, low, k, bucket in zip(highs, lows, ks, buckets)]


def _sum_arrays(results) -> np.ndarray:
    """[T, width] histograms summed over shards."""
    return sum((np.asarray(r.values[0], dtype=np.int64) for r in results),
               np.zeros_like(np.asarray(results[0].values[0], dtype=np.int64)))
