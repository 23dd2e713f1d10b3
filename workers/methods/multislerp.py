"""Multi-SLERP (mergekit 0.1.5's ``multislerp``): a weighted mean of any number of models on the
hypersphere, optionally of their task vectors, over the whole flattened tensor.

    v_i = θ_i − θ₀ with base_model, else θ_i;  w_i ← w_i / Σ w (normalize_weights: true, default)
    u_i = v_i / (‖v_i‖ + eps),  m = Σ w_i u_i,  M = ‖m‖
    M >= eps:                 v = (Σ w_i ‖v_i‖) · cos(eps) · m / M
    M < eps, two models:      v = w₁ v₁ + w₂ v₂
    M < eps, more:            error (antipodal models with balancing weights)
    θ_out = θ₀ + v with base_model, else v;  a single model besides the base is returned unchanged

mergekit computes m / M, projects the u_i to the tangent space there, averages and maps back; the
tangent average is Σ w_i (u_i − (u_i·m̂) m̂) = m − M m̂ = 0 for any inputs, so its exponential map
leaves m̂ (times cos(0 + eps)), and the formula above is what it computes, up to float rounding.
Three passes over the row chunks: the norms, M, the merge (workers/kernels/spherical.py).
docs/algorithms.md §9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field

from workers.kernels import spherical
from workers.methods.base import ConfigError, MethodOptions, MethodParameters, Scalar
from workers.methods.linear import NORMALIZE_RTOL
from workers.methods.slerp import SphericalMethod, copy_through, delta, layout_of, model_weights, tensor_sums


class MultislerpError(ValueError):
    """The weighted mean of three or more unit task vectors is ~0: there is no direction to return."""


class MultislerpModelParameters(MethodParameters):
    weight: Scalar | None = None  # the model's weight in the mean (required, here or at the top level)


class MultislerpParameters(MethodParameters):
    weight: Scalar | None = None  # default weight of every model besides the base
    normalize_weights: bool = True  # divide the weights by their sum
    eps: Scalar = Field(default=1e-8, gt=0)  # added to each norm; the fallback threshold on ‖m‖


class MultislerpOptions(MethodOptions):
    weights: tuple[float, ...]  # of the non-base models, in config order, as given
    normalize_weights: bool
    eps: float
    has_base: bool

    @property
    def uses_base(self) -> bool:
        return self.has_base

    @property
    def effective_weights(self) -> list[float]:
        """The weights the mean uses (divided by their sum with ``normalize_weights``)."""
        total = sum(self.weights)
        return [w / total for w in self.weights] if self.normalize_weights else list(self.weights)


@dataclass(frozen=True)
class MultislerpMethod(SphericalMethod):
    def resolve(self, config) -> MultislerpOptions:
        layout = layout_of(config, self.name)
        if not layout.non_base:
            raise ConfigError(f"multislerp needs at least one model besides base_model {layout.base!r} under models:")
        weights = model_weights(config, layout, self.name)
        p = config.parameters
        total, size = sum(weights), sum(abs(w) for w in weights)
        if p.normalize_weights and len(weights) > 1 and abs(total) <= NORMALIZE_RTOL * size:
            raise ConfigError(
                f"the model weights {list(weights)} sum to {total:.3g}, ~0 relative to their size, so "
                "normalize_weights cannot divide by them (mergekit would write inf / NaN); set normalize_weights: false "
                "or change a weight")
        return MultislerpOptions(method=self.name, weights=weights, normalize_weights=p.normalize_weights,
                                 eps=p.eps, has_base=bool(layout.base))

    def merge_tensor(self, ctx, inputs, options: MultislerpOptions, prepass, out_dtype):
        n = len(options.weights)
        if n == 1:  # mergekit returns the one model as it is
            yield from copy_through(inputs, 0, out_dtype)
            return
        weights, eps = options.effective_weights, options.eps

        def norms(base, experts, r, p):
            return torch.stack([spherical.row_sums(delta(experts[i], base).view(r, p).double() ** 2)
                                for i in range(n)], dim=1)

        norm_sq = [float(s) for s in tensor_sums(ctx, inputs, norms).tolist()]
        mean_scales = [w * u for w, u in zip(weights, spherical.multislerp_unit_scales(norm_sq, eps))]

        def mean_norm(base, experts, r, p):
            m = None
            for i in range(n):
                term = delta(experts[i], base).view(r, p).double() * mean_scales[i]
                m = term if m is None else m + term
            return spherical.row_sums(m * m)

        mean = math.sqrt(max(float(tensor_sums(ctx, inputs, mean_norm)), 0.0))
        if mean >= eps:
            k = spherical.multislerp_coefficients(norm_sq, weights, mean, eps)
        elif n == 2:  # mergekit's fallback for two antipodal inputs: the weighted sum
            k = weights
        else:
            raise MultislerpError(
                f"multislerp: tensor {inputs.task.name!r}: the weighted mean of the models' unit vectors is ~0 "
                f"(‖m‖ = {mean:.3g} < eps = {eps:g}): antipodal models whose weights balance out; change the weights "
                "(mergekit fails here too)")
        coefficients = [ctx.scalar(c) for c in k]
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out = spherical.combine([(experts[i], coefficients[i]) for i in range(n)], base, out_dtype=out_dtype)
            yield rows, out


MULTISLERP = MultislerpMethod(name="multislerp", parameters=MultislerpParameters,
                              model_parameters=MultislerpModelParameters, needs_base=False)
