"""Reinforced Agent Merging (mergekit 0.1.5's ``ram`` and ``ramplus_tl``).

    active_t = |τ_t| > epsilon,  c = Σ_t active_t                          (per element)
    ram:        θ = θ₀ + Σ_t [active_t] · τ_t / max(c, 1)
                (an element changed by one expert takes its τ whole; by several, their mean)
    ramplus_tl: as ram, but where c = 1 the τ_t is scaled by
                λ_t = 1 + r · clamp(ρ_t, 0, alpha),
                ρ_t = #(active_t and c > 1) / max(#(active_t and c = 1), epsilon)   (counts over the tensor)

``ramplus_tl``'s counts are whole-tensor statistics (exact integers, one extra pass over the row
chunks). docs/algorithms.md §10 (RAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import model_validator

from workers.methods.base import MergeMethod, MethodOptions, MethodParameters, Scalar
from workers.methods.model_stock import bytes_with_float64, distinct_experts, shared_only


class RamModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        return shared_only(data, ("epsilon",), "ram")


class RamParameters(MethodParameters):
    epsilon: Scalar = 1e-5  # |τ| above this counts as a change


class RamPlusModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        return shared_only(data, ("r", "alpha", "epsilon"), "ramplus_tl")


class RamPlusParameters(MethodParameters):
    r: Scalar = 0.1  # scale of the overlap boost
    alpha: Scalar = 0.2  # cap on the overlap ratio ρ
    epsilon: Scalar = 1e-5  # |τ| above this counts as a change; also the floor of ρ's divisor


class RamOptions(MethodOptions):
    epsilon: float
    r: float | None = None  # ramplus_tl only
    alpha: float | None = None  # ramplus_tl only

    @property
    def uses_base(self) -> bool:
        return True


def _active(base, experts, epsilon: float):
    """(τ in float32, active [T, n], contributor count [n]); the test |τ| > ε on the exact float64 τ."""
    tau64 = experts.float().double() - base.float().double()
    active = tau64.abs() > epsilon
    return tau64.float(), active, active.sum(dim=0)


@dataclass(frozen=True)
class RamMethod(MergeMethod):
    plus: bool = False

    def resolve(self, config) -> RamOptions:
        self.check_base(config)
        distinct_experts(config, self.name)
        p = config.parameters
        if self.plus:
            return RamOptions(method=self.name, epsilon=p.epsilon, r=p.r, alpha=p.alpha)
        return RamOptions(method=self.name, epsilon=p.epsilon)

    def bytes_per_element(self, task) -> int:
        return bytes_with_float64(task, 2, extra=16)  # exact τ, float32 τ and masks; counts

    def _boosts(self, ctx, inputs, options: RamOptions) -> list[float]:
        """ramplus_tl's λ_t from the whole tensor's shared / unique counts (exact integers)."""
        shared = unique = None
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                _, active, count = _active(base, experts, options.epsilon)
                s, u = (active & (count > 1)).sum(dim=1), (active & (count == 1)).sum(dim=1)
                shared, unique = (s, u) if shared is None else (shared + s, unique + u)
        boosts = []
        for s, u in zip(shared.tolist(), unique.tolist()):
            rho = s / max(u, options.epsilon)
            boosts.append(1 + options.r * min(max(rho, 0.0), options.alpha))
        return boosts

    def merge_tensor(self, ctx, inputs, options: RamOptions, prepass, out_dtype):
        boosts = ctx.vector(self._boosts(ctx, inputs, options)) if self.plus else None
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                tau, active, count = _active(base, experts, options.epsilon)
                divisor = count.clamp(min=1).float()
                merged = None
                for t in range(tau.shape[0]):
                    shared_part = tau[t] / divisor
                    part = torch.where(count == 1, tau[t] * boosts[t], shared_part) if self.plus else shared_part
                    term = torch.where(active[t], part, 0.0)
                    merged = term if merged is None else merged + term
                out = inputs.merged_buffer(experts, out_dtype).copy_(base.float() + merged)
            yield rows, out


RAM = RamMethod(name="ram", parameters=RamParameters, model_parameters=RamModelParameters)
RAMPLUS_TL = RamMethod(name="ramplus_tl", parameters=RamPlusParameters, model_parameters=RamPlusModelParameters,
                       plus=True)
