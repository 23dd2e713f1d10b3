"""Linear merge (weighted average), the smallest complete method: θ = Σ w_t θ_t / Σ w_t.

No base model: every listed model is averaged (a ``base_model`` must be listed among them, with a
weight). docs/algorithms.md §2.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.kernels import linear
from workers.methods.base import ConfigError, MergeMethod, MethodOptions, MethodParameters, Scalar, first, warn_unused_density


class LinearModelParameters(MethodParameters):
    density: Scalar | None = None  # accepted as mergekit does (a TIES key); no effect here, and a warning says so
    weight: Scalar | None = None  # the model's weight in the average (default: parameters.weight, else 1.0)


class LinearParameters(MethodParameters):
    weight: Scalar | None = None  # default weight of every model
    normalize: bool = True  # divide by Σ weights


class LinearOptions(MethodOptions):
    weights: tuple[float, ...]  # one per listed model, in config order
    normalize: bool


NORMALIZE_RTOL = 1e-6  # normalize refuses weights with |Σ w| <= NORMALIZE_RTOL · Σ |w|


def check_normalizable(weights: tuple[float, ...]) -> None:
    """Refuse ``normalize`` when Σ weights is ~0 relative to Σ |weights| (or every weight is 0):
    dividing by it would blow the merged values up by that ratio (1e14 for [0.7, -0.7 + 5.6e-17])."""
    total, size = sum(weights), sum(abs(w) for w in weights)
    if abs(total) <= NORMALIZE_RTOL * size:
        raise ConfigError(
            f"the model weights {list(weights)} sum to {total:.3g}, ~0 relative to their size (Σ|w| = {size:.3g}), "
            "so normalize cannot divide by them; set normalize: false or change a weight so they sum clearly "
            "away from 0")


@dataclass(frozen=True)
class LinearMethod(MergeMethod):
    def resolve(self, config) -> LinearOptions:
        urls = [m.model for m in config.models]
        if config.base_model and config.base_model not in urls:
            raise ConfigError(
                f"linear averages the listed models; base_model {config.base_model!r} is not among them and has no "
                "weight. List it under models: with a weight, or drop base_model")
        warn_unused_density(config, self.name)
        weights = tuple(first(m.parameters.weight, config.parameters.weight, 1.0) for m in config.models)
        normalize = config.parameters.normalize
        if normalize:
            check_normalizable(weights)
        return LinearOptions(method=self.name, weights=weights, normalize=normalize)

    def merge_tensor(self, ctx, inputs, options: LinearOptions, prepass, out_dtype):
        weights = ctx.vector(options.weights)
        divisor = ctx.scalar(sum(options.weights) if options.normalize else 1.0)
        for rows in inputs.ranges:
            _, models = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out = ctx.compiler.run_into(linear.linear_merge, inputs.merged_buffer(models, out_dtype), models,
                                            weights, divisor, out_dtype=out_dtype, numel=models.numel())
            yield rows, out


LINEAR = LinearMethod(name="linear", parameters=LinearParameters, model_parameters=LinearModelParameters,
                      needs_base=False)
