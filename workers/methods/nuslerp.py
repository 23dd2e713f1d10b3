"""NuSLERP (mergekit 0.1.5's ``nuslerp``): slerp of exactly two models, with t from their weights,
optionally of their task vectors, over the whole tensor, its rows or its columns.

    t = w₂ / (w₁ + w₂)   (0.5 when |w₁ + w₂| < 1e-6)
    v_k = θ_k − θ₀ with base_model, else θ_k;   u_k = v_k / max(‖v_k‖, 1e-7),  c = clamp(u₁·u₂)
    1 − c² <= 1e-16 (colinear):  v = (1 − t)·v₁ + t·v₂
    otherwise:                   v = (sin((1 − t)θ)·v₁ + sin(tθ)·v₂) / sin θ,  θ = acos c
    θ_out = θ₀ + v with base_model, else v

The vectors: the whole flattened tensor (``nuslerp_flatten: true``, the default); else each slice
along the last axis (each row of a matrix, ``nuslerp_row_wise: false``) or each slice along axis 0
(each *column* of a matrix, ``nuslerp_row_wise: true``; mergekit's naming). A 1-D tensor is one
vector in every mode. Whole-tensor and per-column sums take a pass over the row chunks before the
merge pass (workers/kernels/spherical.py); per-row vectors lie inside a chunk (one pass).
docs/algorithms.md §9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.kernels import spherical
from workers.methods.base import ConfigError, MethodOptions, MethodParameters, Scalar
from workers.methods.slerp import (
    SphericalMethod,
    chunk_shape,
    delta,
    layout_of,
    model_weights,
    norm_and_dot_rows,
    tensor_sums,
    warn_once,
)
from workers.tensor_io import rows_of


class NuslerpModelParameters(MethodParameters):
    weight: Scalar | None = None  # the model's weight; t = w₂ / (w₁ + w₂) (required, here or at the top level)


class NuslerpParameters(MethodParameters):
    weight: Scalar | None = None  # default weight of every model besides the base
    nuslerp_flatten: bool = True  # one vector per tensor (true) or per row / column (false)
    nuslerp_row_wise: bool = False  # with nuslerp_flatten: false, slices along axis 0 (columns of a matrix)


class NuslerpOptions(MethodOptions):
    weights: tuple[float, float]  # of the two non-base models, in config order
    t: float  # w₂ / (w₁ + w₂), or 0.5
    flatten: bool
    row_wise: bool
    has_base: bool  # interpolate the task vectors θ_k − θ₀ and add θ₀ back

    @property
    def uses_base(self) -> bool:
        return self.has_base


def vector_mode(options: NuslerpOptions, shape: tuple[int, ...]) -> str:
    """How one tensor is cut into vectors: "whole" (flattened; also any 0-d or 1-D tensor, whose last
    axis and axis 0 are the whole vector), "columns" (slices along axis 0) or "rows" (along the last axis)."""
    if options.flatten or len(shape) <= 1:
        return "whole"
    return "columns" if options.row_wise else "rows"


@dataclass(frozen=True)
class NuslerpMethod(SphericalMethod):
    def held_bytes(self, task) -> int:
        """Per-column partial sums of nuslerp_row_wise: 3 float64 per row element per level of the row tree."""
        per_row = math.prod(task.shape[1:]) if len(task.shape) >= 2 else 1
        return 3 * 8 * per_row * (max(1, rows_of(task.shape)).bit_length() + 1)

    def resolve(self, config) -> NuslerpOptions:
        layout = layout_of(config, self.name)
        if len(layout.non_base) != 2:
            others = [config.models[i].model for i in layout.non_base]
            besides = " besides base_model" if layout.base else " (no base_model given)"
            raise ConfigError(
                f"nuslerp interpolates exactly two models{besides}; this config has {len(others)}: {others}. "
                "List exactly two (use multislerp or karcher for more)")
        weights = model_weights(config, layout, self.name)
        p = config.parameters
        if p.nuslerp_flatten and p.nuslerp_row_wise:
            warn_once("nuslerp_row_wise has no effect while nuslerp_flatten is true (the default): the whole tensor is "
                      "one vector; set nuslerp_flatten: false to interpolate column by column (as in mergekit)")
        return NuslerpOptions(method=self.name, weights=weights, t=spherical.nuslerp_t(*weights),
                              flatten=p.nuslerp_flatten, row_wise=p.nuslerp_row_wise, has_base=bool(layout.base))

    def merge_tensor(self, ctx, inputs, options: NuslerpOptions, prepass, out_dtype):
        mode, t = vector_mode(options, inputs.task.shape), options.t
        if mode == "rows":
            yield from self._per_row(ctx, inputs, t, out_dtype)
            return

        def per_row(base, experts, r, p):
            v0, v1 = (delta(experts[k], base).view(r, p).double() for k in (0, 1))
            if mode == "whole":
                return norm_and_dot_rows(v0, v1)  # [r, 3]
            values = v0.new_empty((r, 3, p))  # [r, 3, p]: every column on its own
            for k, (a, b) in enumerate(((v0, v0), (v1, v1), (v0, v1))):
                torch.mul(a, b, out=values[:, k])
            return values

        sums = tensor_sums(ctx, inputs, per_row)
        with ctx.timer.track("kernel"):
            c0, c1, _ = spherical.nuslerp_coefficients(sums[0], sums[1], sums[2], t)
            c0, c1 = c0.float(), c1.float()  # one per tensor ("whole") or per column [p]
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            r, p = chunk_shape(inputs, rows)
            with ctx.timer.track("kernel"):
                terms = [(experts[k].view(r, p), c) for k, c in ((0, c0), (1, c1))]
                out = spherical.combine(terms, None if base is None else base.view(r, p), out_dtype=out_dtype)
            yield rows, out.reshape(-1)

    @staticmethod
    def _per_row(ctx, inputs, t: float, out_dtype):
        """Vectors along the last axis: each lies inside a row chunk, merged in one pass."""
        length = inputs.task.shape[-1]
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                n = experts.shape[1]
                vectors = n // length if length else 0
                if vectors == 0:
                    yield rows, experts[0].to(out_dtype)
                    continue
                v0, v1 = (delta(experts[k], base).view(vectors, length).double() for k in (0, 1))
                sums = norm_and_dot_rows(v0, v1)
                c0, c1, _ = spherical.nuslerp_coefficients(sums[:, 0], sums[:, 1], sums[:, 2], t)
                terms = [(experts[k].view(vectors, length), c.float()[:, None]) for k, c in ((0, c0), (1, c1))]
                out = spherical.combine(terms, None if base is None else base.view(vectors, length),
                                        out_dtype=out_dtype)
            yield rows, out.reshape(-1)


NUSLERP = NuslerpMethod(name="nuslerp", parameters=NuslerpParameters, model_parameters=NuslerpModelParameters,
                        needs_base=False)
