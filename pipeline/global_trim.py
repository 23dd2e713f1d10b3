"""Paper-exact TIES trim: one threshold per expert over the whole model, found across shards.

Pass 1: every shard reports, per expert, a histogram of the high 16 bits of |τ|'s float32 bits;
the coordinator sums them and locates, per expert, the bucket holding the k-th smallest value
(k = d − int(d·density), 1-based, as kthvalue on the flattened model). Pass 2: shards report the
low-16-bit histogram inside that bucket, which pins the exact threshold. Pass 3 (zero_sign
majority): shards report Σγ as exact integers. The coordinator only ever holds histograms.

Reads of each input: 3 (thresholds + merge) with zero_sign positive, 4 with majority.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from pipeline.planner import ShardPlan
from workers import selection, ties
from workers.selection import TrimRule

LOG = logging.getLogger(__name__)


def global_k(d: int, density: float) -> int:
    """The paper's 1-based rank of the threshold: k = d − int(d·density) (0: keep everything)."""
    return d - int(d * density)


def compute_global_trim(plan: ShardPlan, run_scans) -> tuple[tuple[TrimRule, ...], float, dict]:
    """Thresholds and zero sign for the whole model. ``run_scans(kind, extra_args)`` runs one scan
    task per shard and returns their ``ScanResult`` s. Returns (rules, zero_sign, manifest record)."""
    method = plan.method
    scanned: list = []

    def scan(kind, args):
        results = run_scans(kind, args)
        scanned.extend(results)
        return results

    highs = _sum_arrays(scan("high", ()))
    d = int(highs[0].sum())
    ks = [global_k(d, density) for density in method.densities]
    buckets = tuple(selection.locate(torch.from_numpy(h), k)[0] if k > 0 else -1 for h, k in zip(highs, ks))
    lows = _sum_arrays(scan("low", (buckets,)))
    rules, records = [], []
    for t, (high, low, k, bucket) in enumerate(zip(highs, lows, ks, buckets)):
        if k == 0:
            rule, kept = TrimRule.keep_all(), d
        else:
            stat = selection.resolve(torch.from_numpy(high), bucket, torch.from_numpy(low), k)
            rule, kept = TrimRule(stat.value, None), stat.n_equal + stat.n_above
        rules.append(rule)
        records.append({"expert": plan.inputs[t + 1].url, "density": method.densities[t], "d": d, "k": k,
                        "threshold": rule.threshold, "kept": kept})
    zero_sign, sign_sum = 1.0, None
    if method.zero_sign == "majority":
        sign_sum = sum(int(r.values[0]) for r in scan("sign", (tuple(rules),)))
        zero_sign = ties.majority_sign(sign_sum)
    record = {"trim_scope": "global", "experts": records, "elected_sign_sum": sign_sum, "zero_sign": zero_sign,
              "input_reads": 4 if method.zero_sign == "majority" else 3,
              "scan_bytes_read": sum(r.bytes_read for r in scanned)}
    LOG.info("global trim: d=%d thresholds=%s zero_sign=%+.0f", d, [r.threshold for r in rules], zero_sign)
    return tuple(rules), zero_sign, record


def with_global_rules(plan: ShardPlan, rules: tuple[TrimRule, ...], zero_sign: float) -> tuple:
    """The plan's shard specs, each carrying the model-wide rules and zero sign."""
    return tuple(dataclasses.replace(s, trim_rules=rules, zero_sign=zero_sign) for s in plan.shards)


def _sum_arrays(results) -> np.ndarray:
    """[T, width] histograms summed over shards."""
    return sum((np.asarray(r.values[0], dtype=np.int64) for r in results),
               np.zeros_like(np.asarray(results[0].values[0], dtype=np.int64)))
