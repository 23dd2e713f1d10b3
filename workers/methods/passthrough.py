"""Passthrough (mergekit 0.1.5's ``passthrough``, whole-model form): copy the one listed model,
each float tensor optionally multiplied by its ``scale``.

    θ = θ₁                 (scale not given)
    θ = scale · θ₁         (float32 product, cast once to the output dtype)

mergekit's frankenmerges (``slices:`` stacking layer ranges) run this method once per slice
(pipeline/slices.py).
docs/algorithms.md §10 (Passthrough).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.methods.base import ConfigError, MergeMethod, MethodOptions, MethodParameters, Scalar
from workers.methods.model_stock import refuse_duplicates


class PassthroughModelParameters(MethodParameters):
    scale: Scalar | None = None  # multiplies every float tensor of the model (default: parameters.scale, else none)


class PassthroughParameters(MethodParameters):
    scale: Scalar | None = None  # default scale of the model


class PassthroughOptions(MethodOptions):
    scale: float | None  # None: the tensors are copied (cast to the output dtype)


@dataclass(frozen=True)
class PassthroughMethod(MergeMethod):
    def resolve(self, config) -> PassthroughOptions:
        refuse_duplicates(config, self.name)
        models = [m.model for m in config.models]
        if len(models) != 1:
            raise ConfigError(
                f"passthrough copies exactly one model (mergekit: exactly 1 input); models: lists {len(models)}. "
                "List one model, or stack layer ranges of several with slices:")
        if config.base_model and config.base_model != models[0]:
            raise ConfigError(
                f"passthrough takes no base model: mergekit adds base_model {config.base_model!r} as a second input "
                "and refuses the merge (exactly 1 input). Drop base_model, or set it to the listed model")
        scale = config.models[0].parameters.scale
        return PassthroughOptions(method=self.name, scale=config.parameters.scale if scale is None else scale)

    def merge_tensor(self, ctx, inputs, options: PassthroughOptions, prepass, out_dtype):
        scale = None if options.scale is None else ctx.scalar(options.scale)
        for rows in inputs.ranges:
            _, models = inputs.load(rows)
            with ctx.timer.track("kernel"):
                value = models[0] if scale is None else models[0].float() * scale
                out = inputs.merged_buffer(models, out_dtype).copy_(value)
            yield rows, out


PASSTHROUGH = PassthroughMethod(name="passthrough", parameters=PassthroughParameters,
                                model_parameters=PassthroughModelParameters, needs_base=False)
