"""TIES-Merging: trim each τ_t to its largest |τ|, elect a sign per element, average the agreeing part.

Per-tensor trim (mergekit's) selects each expert's threshold exactly without sorting, usually in one
bracketed pass over the tensor's chunks, else two counting passes (workers/kernels/selection.py,
workers/methods/ties_passes.py); the paper's model-wide trim
(``trim_scope: global``) is this method's pre-pass (workers/methods/ties_global.py), whose rules
reach every shard as ``spec.prepass``. docs/algorithms.md §4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from workers.diagnostics import merge_chunk
from workers.kernels import ties
from workers.methods import ties_global
from workers.methods.base import MergeMethod, MethodParameters, Scalar, expert_models, first
from workers.methods.task_arithmetic import TaskVectorOptions, expert_weights
from workers.methods.ties_passes import TrimCuts, per_tensor_rules, sign_sum

LOG = logging.getLogger(__name__)

DEFAULT_DENSITY = 1.0  # mergekit's default: no trim (the TIES paper's recipe is 0.2; a hint says so)
PAPER_DENSITY = 0.2


class TiesModelParameters(MethodParameters):
    weight: Scalar | None = None  # the expert's weight (multiplies τ before the sign vote)
    density: Scalar | None = Field(default=None, gt=0, le=1)  # fraction of |τ| kept (default: parameters.density)


class TiesParameters(MethodParameters):
    weight: Scalar | None = None  # default weight of every expert
    density: Scalar | None = Field(default=None, gt=0, le=1)  # default fraction of |τ| kept (1.0, as mergekit)
    normalize: bool = True  # divide by the sum of the agreeing weights
    lam: float = Field(default=1.0, alias="lambda")  # λ on the merged task vector
    int8_mask: bool | None = None  # mergekit memory option; accepted, no effect (masks are never materialised)
    trim_scope: Literal["tensor", "global"] = "tensor"  # threshold per tensor (mergekit) or per model (paper)
    sign_method: Literal["sum", "count"] = "sum"  # sign election by mass or by count
    zero_sign: Literal["positive", "majority"] | None = None  # sign where the vote is 0 (tensor: positive, global: majority)

    @model_validator(mode="after")
    def _zero_sign_default(self):
        if self.zero_sign is None:
            object.__setattr__(self, "zero_sign", "majority" if self.trim_scope == "global" else "positive")
        return self


class TiesOptions(TaskVectorOptions):
    trim_scope: Literal["tensor", "global"]
    sign_method: Literal["sum", "count"]
    zero_sign: Literal["positive", "majority"]


@dataclass(frozen=True)
class TiesMethod(MergeMethod):
    def resolve(self, config) -> TiesOptions:
        self.check_base(config)
        p = config.parameters
        experts = expert_models(config, True)
        densities = tuple(first(m.parameters.density, p.density, DEFAULT_DENSITY) for m in experts)
        if p.density is None and all(m.parameters.density is None for m in experts):
            LOG.warning("ties without a density keeps every τ (mergekit's default, density 1.0); the TIES paper's "
                        "recipe trims to density: %s", PAPER_DENSITY)
        return TiesOptions(method=self.name, weights=expert_weights(config), densities=densities, lam=p.lam,
                           normalize=p.normalize, trim_scope=p.trim_scope, sign_method=p.sign_method,
                           zero_sign=p.zero_sign)

    def bytes_per_element(self, task) -> int:
        # the eager kernels' τ, |τ| and kept τ per expert beyond the default (bench: calibrate_memory.py)
        return super().bytes_per_element(task) + 16 * (len(task.inputs) - 1)

    def prepass(self, options: TiesOptions, plan, run_scans, saved):
        if options.trim_scope != "global":
            return None
        return ties_global.global_trim(options, plan, run_scans, saved)

    def merge_tensor(self, ctx, inputs, options: TiesOptions, prepass, out_dtype):
        weights = ctx.vector(options.weights)
        sign_by_count = options.sign_method == "count"
        if prepass is not None:  # global scope: rules and zero sign come from the whole model
            rules, zero_sign = list(prepass.rules), prepass.zero_sign
        else:
            rules = per_tensor_rules(ctx, inputs, options.densities)
            zero_sign = (ties.majority_sign(sign_sum(ctx, inputs, rules, weights, sign_by_count))
                         if options.zero_sign == "majority" else 1.0)
        cuts = TrimCuts(ctx, rules)
        lam, zero = ctx.scalar(options.lam), ctx.scalar(zero_sign)
        probe = ctx.probe(inputs.task, len(options.weights), elects_sign=True)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out, counts = merge_chunk(ctx, probe is not None, ties.ties_merge,
                                          inputs.merged_buffer(experts, out_dtype), base, experts, cuts.thr,
                                          cuts.for_chunk(base, experts), weights, lam, zero, sign_by_count=sign_by_count,
                                          normalize=options.normalize, out_dtype=out_dtype)
            if probe:
                probe.chunk(ctx, rows, base, experts, out, counts)
            yield rows, out
        if probe:
            probe.finish()


TIES = TiesMethod(name="ties", parameters=TiesParameters, model_parameters=TiesModelParameters)
