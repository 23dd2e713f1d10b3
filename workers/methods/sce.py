"""SCE (mergekit 0.1.5's ``sce``): Select by variance, Calculate per-model weights, Erase minority signs.

    σ²    = Var_t(τ_t) per element (population variance over the N experts)
    Select: with 0 < select_topk < 1 keep the k = int(count(σ² ≠ 0) · select_topk) elements of largest
            σ² (ties at the cut: lowest flat index first) in every τ_t, zero the rest; select_topk ≤ 0
            zeroes every τ, ≥ 1 keeps all
    w_t   = mean over the tensor of τ_t², normalised to Σ w = 1 (uniform 1/N when Σ w < 1e-6)
    Erase: γ = +1 where Σ_t τ_t ≥ 0 else −1; e_t = w_t where sign(τ_t) = γ (τ_t = 0 never agrees), else 0
    θ     = θ₀ + Σ_t e_t τ_t / max(Σ_t e_t, 1e-6)

The variance cut (exact float64 selection over every row chunk, workers/kernels/order64.py) and
the weights (fixed-tree float64 sums) are whole-tensor statistics, computed before any chunk is
merged. docs/algorithms.md §10 (SCE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import model_validator

from workers.chunks import chunk_values
from workers.kernels.order64 import TopCut, TopRule, top_n_rule
from workers.kernels.tree_sum import TreeSum
from workers.methods.base import MergeMethod, MethodOptions, MethodParameters, Scalar
from workers.methods.model_stock import bytes_with_float64, distinct_experts, flat_start, shared_only

WEIGHT_SUM_FLOOR = 1e-6  # Σ w below this: uniform weights
DIVISOR_FLOOR = 1e-6  # Σ e_t is clamped to at least this


class SceModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        return shared_only(data, ("select_topk", "int8_mask"), "sce")


class SceParameters(MethodParameters):
    select_topk: Scalar = 1.0  # fraction of the nonzero-variance elements kept (≥ 1: all, ≤ 0: none)
    int8_mask: bool = False  # mergekit memory option; accepted, no effect (masks are never materialised)


class SceOptions(MethodOptions):
    select_topk: float
    n_experts: int

    @property
    def uses_base(self) -> bool:
        return True


def sce_keep_count(nonzero: int, select_topk: float) -> int:
    """mergekit's k: int(count_nonzero(σ²) · select_topk) with the product taken in float32, as torch
    does for an int64 count times a Python float."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * select_topk)


def _taus(base, experts) -> torch.Tensor:
    return experts.float().double() - base.float().double()


def _variance(tau: torch.Tensor) -> torch.Tensor:
    """Population variance over the experts, element by element, in float64 (a fixed order)."""
    n = tau.shape[0]
    total = tau[0]
    for x in tau[1:]:
        total = total + x
    mean = total / n
    acc = (tau[0] - mean).square()
    for x in tau[1:]:
        acc = acc + (x - mean).square()
    return acc / n


@dataclass(frozen=True)
class SceMethod(MergeMethod):
    def resolve(self, config) -> SceOptions:
        self.check_base(config)
        experts = distinct_experts(config, self.name)
        return SceOptions(method=self.name, select_topk=config.parameters.select_topk, n_experts=len(experts))

    def bytes_per_element(self, task) -> int:
        return bytes_with_float64(task, 3, extra=40)  # τ, the selected τ and its squares; σ², keys, tie counts

    def _rule(self, ctx, inputs, options: SceOptions) -> TopRule | None:
        """Which σ² survive the selection (None: all)."""
        s, numel = options.select_topk, math.prod(inputs.task.shape)
        if s >= 1:
            return None
        if s <= 0:
            return TopRule(2**63 - 1, 0)

        variances = chunk_values(ctx, inputs, lambda rows, base, experts: _variance(_taus(base, experts)))

        nonzero = sum(int(torch.count_nonzero(v)) for v in variances())
        k = sce_keep_count(nonzero, s)
        if k <= 0:
            return TopRule(2**63 - 1, 0)
        return top_n_rule(variances, numel, k)

    def _selected(self, base, experts, cut: TopCut) -> torch.Tensor:
        tau = _taus(base, experts)
        keep = cut.keep(_variance(tau))
        return tau if keep is None else tau * keep

    def merge_tensor(self, ctx, inputs, options: SceOptions, prepass, out_dtype):
        task, n = inputs.task, options.n_experts
        numel = math.prod(task.shape)
        rule = self._rule(ctx, inputs, options) if numel else None
        squares, like = TreeSum(), None
        cut = TopCut(rule)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                tau = self._selected(base, experts, cut)
                like = tau
                squares.add(flat_start(task, rows), tau.square())
        means = (squares.total(like) / max(numel, 1)).tolist()  # mergekit: mean over the tensor's elements
        total = sum(means)
        weights = [1.0 / n] * n if abs(total) < WEIGHT_SUM_FLOOR else [m / total for m in means]
        w = ctx.vector(weights)
        cut = TopCut(rule)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                tau = self._selected(base, experts, cut)
                vote = tau[0]
                for x in tau[1:]:
                    vote = vote + x
                majority = torch.where(vote >= 0, 1.0, -1.0).to(tau.dtype)
                merged = divisor = None
                for t in range(n):
                    e = w[t] * (torch.sign(tau[t]) == majority)  # the erased weight e_t
                    term = tau[t].float() * e
                    merged = term if merged is None else merged + term
                    divisor = e if divisor is None else divisor + e
                out = base.float() + merged / divisor.clamp(min=DIVISOR_FLOOR)
                out = inputs.merged_buffer(experts, out_dtype).copy_(out)
            yield rows, out


SCE = SceMethod(name="sce", parameters=SceParameters, model_parameters=SceModelParameters)
