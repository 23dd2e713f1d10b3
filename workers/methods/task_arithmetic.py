"""Task arithmetic: θ = θ₀ + λ · Σ w_t τ_t with τ_t = θ_t − θ₀ (÷ Σ w_t with ``normalize``).

docs/algorithms.md §3. ``TaskVectorOptions`` is shared with TIES, the other
member of the task-vector family (task arithmetic is TIES without trim or sign election).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from workers.diagnostics import merge_chunk
from workers.kernels import linear
from workers.methods.base import MergeMethod, MethodOptions, MethodParameters, Scalar, expert_models, first, warn_unused_density
from workers.methods.linear import check_normalizable


class TaskArithmeticModelParameters(MethodParameters):
    density: Scalar | None = None  # accepted as mergekit does (a TIES key); no effect here, and a warning says so
    weight: Scalar | None = None  # the expert's weight on its task vector (default: parameters.weight, else 1.0)


class TaskArithmeticParameters(MethodParameters):
    weight: Scalar | None = None  # default weight of every expert
    normalize: bool = False  # divide Σ w_t τ_t by Σ w_t
    lam: float = Field(default=1.0, alias="lambda")  # λ on the merged task vector
    int8_mask: bool | None = None  # mergekit memory option; accepted, no effect (masks are never materialised)


class TaskVectorOptions(MethodOptions):
    """Options of the task-vector methods (task arithmetic, TIES)."""

    weights: tuple[float, ...]  # one per expert, in config order
    densities: tuple[float, ...]  # fraction of |τ| kept per expert (1.0: no trim, as in task arithmetic)
    lam: float  # λ scaling of the merged task vector
    normalize: bool  # divide by the sum of (agreeing) weights

    @property
    def uses_base(self) -> bool:
        return True


def expert_weights(config) -> tuple[float, ...]:
    """Per expert: its weight, else the top-level weight, else 1.0."""
    return tuple(first(m.parameters.weight, config.parameters.weight, 1.0) for m in expert_models(config, True))


@dataclass(frozen=True)
class TaskArithmeticMethod(MergeMethod):
    def resolve(self, config) -> TaskVectorOptions:
        self.check_base(config)
        warn_unused_density(config, self.name)
        weights = expert_weights(config)
        p = config.parameters
        if p.normalize:
            check_normalizable(weights)
        return TaskVectorOptions(method=self.name, weights=weights, densities=(1.0,) * len(weights), lam=p.lam,
                                 normalize=p.normalize)

    def merge_tensor(self, ctx, inputs, options: TaskVectorOptions, prepass, out_dtype):
        weights, lam = ctx.vector(options.weights), ctx.scalar(options.lam)
        divisor = ctx.scalar(sum(options.weights) if options.normalize else 1.0)
        probe = ctx.probe(inputs.task, len(options.weights), elects_sign=False)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out, counts = merge_chunk(ctx, probe is not None, linear.task_arithmetic_merge,
                                          inputs.merged_buffer(experts, out_dtype), base, experts, weights, lam,
                                          divisor, out_dtype=out_dtype)
            if probe:
                probe.chunk(ctx, rows, base, experts, out, counts)
            yield rows, out
        if probe:
            probe.finish()


TASK_ARITHMETIC = TaskArithmeticMethod(name="task_arithmetic", parameters=TaskArithmeticParameters,
                                       model_parameters=TaskArithmeticModelParameters)
