"""NearSwap (mergekit 0.1.5's ``nearswap``): take the other model's value where it lies near the base.

    w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1)        θ = w·θ₁ + (1 − w)·θ₀

element by element, with θ₀ the base and θ₁ the one other model; ``t`` (required, no default) is
the distance below which θ₁ is taken whole. docs/algorithms.md §10 (NearSwap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import model_validator

from workers.methods.base import ConfigError, MergeMethod, MethodOptions, MethodParameters, Scalar
from workers.methods.model_stock import distinct_experts, shared_only

DISTANCE_FLOOR = 1e-6  # mergekit clamps |θ₀ − θ₁| to at least this before dividing


class NearswapModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        return shared_only(data, ("t",), "nearswap")


class NearswapParameters(MethodParameters):
    t: Scalar | None = None  # required: the similarity distance (|θ₀ − θ₁| ≤ t takes θ₁ whole)


class NearswapOptions(MethodOptions):
    t: float

    @property
    def uses_base(self) -> bool:
        return True


def nearswap_kernel(base: torch.Tensor, other: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b = base.float(), other.float()
    weight = (t / (a - b).abs().clamp(min=DISTANCE_FLOOR)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


@dataclass(frozen=True)
class NearswapMethod(MergeMethod):
    def resolve(self, config) -> NearswapOptions:
        self.check_base(config)
        experts = distinct_experts(config, self.name)
        if len(experts) != 1:
            raise ConfigError(
                f"nearswap merges exactly one model into base_model (mergekit: exactly 2 inputs counting the base); "
                f"got {len(experts)} besides the base. List one model under models:")
        t = config.parameters.t
        if t is None:
            raise ConfigError("nearswap needs parameters.t (no default in mergekit): the distance |θ₀ − θ₁| up to "
                              "which the model's value replaces the base's, e.g. parameters: {t: 0.0001}")
        if math.isnan(t):
            raise ConfigError("parameters.t is NaN; nearswap would output NaN everywhere: give a number")
        return NearswapOptions(method=self.name, t=t)

    def bytes_per_element(self, task) -> int:
        return super().bytes_per_element(task) + 20  # float32 a, b, |a − b| and the weight (bench: calibrate_memory.py)

    def merge_tensor(self, ctx, inputs, options: NearswapOptions, prepass, out_dtype):
        t = ctx.scalar(options.t)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out = inputs.merged_buffer(experts, out_dtype).copy_(nearswap_kernel(base, experts[0], t))
            yield rows, out


NEARSWAP = NearswapMethod(name="nearswap", parameters=NearswapParameters, model_parameters=NearswapModelParameters)
