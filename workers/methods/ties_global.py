"""TIES's model-wide trim (``trim_scope: global``, the paper's code): one threshold per expert over
the whole flattened model, found by scans over every shard, before the shards merge.

Pass 1: every shard reports, per expert, a histogram of the high 16 bits of |τ|'s float32 bits;
the coordinator sums them and locates, per expert, the bucket holding the k-th smallest value
(k = d − int(d·density), 1-based, as kthvalue on the flattened model). Pass 2: shards report the
low-16-bit histogram inside that bucket, which pins the exact threshold. Pass 3 (zero_sign
majority): shards report Σγ as exact integers. The coordinator only ever holds histograms.

Reads of each input: 3 (thresholds + merge) with zero_sign positive, 4 with majority.
docs/algorithms.md §4.4.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from workers.kernels import selection, ties
from workers.kernels.selection import TrimRule
from workers.methods.base import Prepass
from workers.methods.ties_passes import histograms, sign_sum

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalTrim:
    """What every shard of a global-scope run merges with: one rule per expert and the zero sign."""

    rules: tuple[TrimRule, ...]
    zero_sign: float


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

    highs = _sum_arrays(scan(HighHistogramScan(len(options.densities))))
    d = int(highs[0].sum())
    ks = [global_k(d, density) for density in options.densities]
    buckets = tuple(selection.locate(torch.from_numpy(h), k)[0] if k > 0 else -1 for h, k in zip(highs, ks))
    lows = _sum_arrays(scan(LowHistogramScan(buckets)))
    rules, records = [], []
    experts = [i for i in plan.inputs if i.role == "expert"]
    for t, (high, low, k, bucket) in enumerate(zip(highs, lows, ks, buckets)):
        if k == 0:
            rule, kept = TrimRule.keep_all(), d
        else:
            stat = selection.resolve(torch.from_numpy(high), bucket, torch.from_numpy(low), k)
            rule, kept = TrimRule(stat.value, None), stat.n_equal + stat.n_above
        rules.append(rule)
        records.append({"expert": experts[t].url, "density": options.densities[t], "d": d, "k": k,
                        "threshold": rule.threshold, "kept": kept})
    zero_sign, total = 1.0, None
    if options.zero_sign == "majority":
        total = sum(int(r.values[0]) for r in scan(SignSumScan(tuple(rules), options.weights,
                                                               options.sign_method == "count")))
        zero_sign = ties.majority_sign(total)
    record = {"trim_scope": "global", "experts": records, "elected_sign_sum": total, "zero_sign": zero_sign,
              "input_reads": 4 if options.zero_sign == "majority" else 3,
              "scan_bytes_read": sum(r.bytes_read for r in scanned)}
    LOG.info("global trim: d=%d thresholds=%s zero_sign=%+.0f", d, [r.threshold for r in rules], zero_sign)
    return {"rules": [dataclasses.asdict(r) for r in rules], "zero_sign": zero_sign, "record": record}


def _sum_arrays(results) -> np.ndarray:
    """[T, width] histograms summed over shards."""
    return sum((np.asarray(r.values[0], dtype=np.int64) for r in results),
               np.zeros_like(np.asarray(results[0].values[0], dtype=np.int64)))
