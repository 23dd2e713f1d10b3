"""The passes TIES makes over one tensor's chunks: the bracketed selection and the |τ| histograms
(exact selection without sorting, workers/kernels/selection.py), the elected-sign sum, and the
per-chunk trim cuts with tie quotas.
Per-tensor trim (workers/methods/ties.py) and the model-wide scans (ties_global.py) share them."""

from __future__ import annotations

import math

import torch

from workers.kernels import selection, ties
from workers.kernels.selection import TrimRule
from workers.tensor_io import rows_of


class TrimCuts:
    """Per-chunk ``thr`` / ``cut`` tensors for the kernels, chunk by chunk in order.

    Only rules with a tie quota look at the data, and only those whose ``tie_cut`` the selection
    did not find: they count the ties of each chunk and carry the count. A quota at threshold 0
    needs no cut either, since a zero τ contributes nothing whichever way it is trimmed."""

    def __init__(self, ctx, rules: list[TrimRule]):
        self.ctx, self.rules = ctx, rules
        self.thr = ctx.vector([r.threshold for r in rules])
        self._quota = [r.tie_quota is not None and r.threshold > 0 for r in rules]
        self._counted = [q and r.tie_cut is None for q, r in zip(self._quota, rules)]
        self._ties_before = [0] * len(rules)
        self._offset = 0  # flat index of the chunk's first element

    def for_chunk(self, base, experts) -> torch.Tensor:
        cuts = [r.tie_cut - self._offset if q and not c else ties.ALL_TIES
                for r, q, c in zip(self.rules, self._quota, self._counted)]
        if any(self._counted):
            counts = self.ctx.compiler.run(ties.tied_block_counts, base, experts, self.thr, numel=experts.numel())
            for t, rule in enumerate(self.rules):
                if self._counted[t]:
                    def block_mask(block: int, t=t) -> torch.Tensor:
                        span = slice(block * ties.TIE_BLOCK, (block + 1) * ties.TIE_BLOCK)
                        return ties.tied_mask(base[span], experts[t:t + 1, span], self.thr[t:t + 1])[0]

                    cuts[t], n_tied = ties.tie_cut(counts[t], rule, self._ties_before[t], block_mask)
                    self._ties_before[t] += n_tied
        self._offset += base.numel()
        return self.ctx.vector(cuts, torch.int64)


def histograms(ctx, inputs, buckets: list[int] | None) -> torch.Tensor:
    """[T, width] counts of |τ|'s high bits (``buckets`` None) or of its low bits inside each
    expert's bucket, over every chunk of the tensor."""
    total = None
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with ctx.timer.track("kernel"):
            if buckets is None:
                ids = ctx.buffer(("ids",), experts.shape, torch.int16)
                ctx.compiler.run_into(selection.high_bucket_ids, ids, base, experts, numel=experts.numel())
                counts = selection.count_ids(ids, selection.HIGH_BUCKETS)
            else:
                counts = low_counts(ctx, base, experts, buckets)
            total = counts if total is None else total + counts
    return total


def low_counts(ctx, base, experts, buckets: list[int]) -> torch.Tensor:
    """One chunk's low-bit counts inside each expert's bucket: from the elements a bucket flags
    (a bucket holds ~1 % of them), or, when more than a quarter are flagged or a bucket holds
    infinities, by counting ids for every element."""
    brackets = selection.bucket_brackets(buckets, base.device)
    if brackets is not None:
        flags = ctx.buffer(("flags",), base.shape, torch.int32)
        ctx.compiler.run_into(selection.bracket_flags, flags, base, experts, *brackets, numel=experts.numel())
        flagged = selection.flagged_magnitudes(flags, base, experts, base.numel() // 4)
        if flagged is not None:
            return selection.low_counts_of_flagged(flagged[1], buckets)
    ids = ctx.buffer(("ids",), experts.shape, torch.int32)
    ctx.compiler.run_into(selection.low_bucket_ids, ids, base, experts, ctx.vector(buckets, torch.int32),
                          numel=experts.numel())
    return selection.count_ids(ids, selection.LOW_BUCKETS)


def bracketed_rules(ctx, inputs, ks: list[int | None], n_keep: list[int]) -> list[TrimRule] | None:
    """Per expert, the rule keeping its ``n_keep`` largest |τ| of the tensor, in one pass over its
    chunks (``selection.BracketedSelection``); None when the histograms must decide."""
    numel = math.prod(inputs.task.shape)
    selected = selection.BracketedSelection(ks, numel, max(1, numel // rows_of(inputs.task.shape)), ctx.compiler.run)
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with ctx.timer.track("kernel"):
            if not selected.add(base, experts, ctx.buffer(("flags",), base.shape, torch.int32)):
                return None
    with ctx.timer.track("kernel"):
        return selected.rules(n_keep)


def sign_sum(ctx, inputs, rules: list[TrimRule], weights: torch.Tensor, sign_by_count: bool) -> int:
    """Σγ over one tensor's elements (the elected signs before the zero fill), an exact integer."""
    cuts, total = TrimCuts(ctx, rules), 0
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        with ctx.timer.track("kernel"):
            positive, negative = ctx.compiler.run(ties.ties_vote_counts, base, experts, cuts.thr,
                                                  cuts.for_chunk(base, experts), weights,
                                                  sign_by_count=sign_by_count, numel=experts.numel())
            total += int(positive) - int(negative)
    return total


def per_tensor_rules(ctx, inputs, densities: tuple[float, ...]) -> list[TrimRule]:
    """Trim rules for one tensor: exactly ``keep_count(numel, density)`` largest |τ| per expert (two
    counting passes; ties at the cut kept by lowest flat index)."""
    numel = math.prod(inputs.task.shape)
    return top_n_rules(ctx, inputs, [selection.keep_count(numel, d) for d in densities])


def top_n_rules(ctx, inputs, n_keep: list[int]) -> list[TrimRule]:
    """Per expert, the rule keeping exactly its ``n_keep`` largest |τ| of the tensor, ties by lowest
    flat index: a high-bit and a low-bit counting pass over the chunks (none when nothing is cut)."""
    numel = math.prod(inputs.task.shape)
    ks = [None if n >= numel else numel - n + 1 for n in n_keep]
    if all(k is None for k in ks):
        return [TrimRule.keep_all() for _ in n_keep]
    if any(n <= 0 for n in n_keep):
        raise ValueError("top_n_rules keeps at least one element per expert")
    if numel >= selection.BRACKET_MIN_ELEMENTS:
        rules = bracketed_rules(ctx, inputs, ks, n_keep)
        if rules is not None:
            return rules
    highs = histograms(ctx, inputs, None).cpu()
    buckets = [selection.locate(h, k)[0] if k is not None else -1 for h, k in zip(highs, ks)]
    lows = histograms(ctx, inputs, buckets).cpu()
    return [selection.top_n_rule(highs[t], buckets[t], lows[t], n) if ks[t] is not None else TrimRule.keep_all()
            for t, n in enumerate(n_keep)]
