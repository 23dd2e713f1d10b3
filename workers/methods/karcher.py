"""Karcher mean (mergekit 0.1.5's ``karcher``): the Riemannian (geodesic) mean of the models'
directions on the unit sphere, rescaled by their mean norm, over the whole flattened tensor.

Every input counts, with weight 1/N: the listed models and, when given and not listed,
``base_model`` as one more point (mergekit appends it to the inputs; karcher has no notion of a
base). With u_i = θ_i / ‖θ_i‖ (inputs with ‖θ_i‖ <= tol left out of the direction):

    mean ← normalize(Σ u_i / n)            (the first u_i when that sum's norm < tol)
    repeat at most max_iter times:
        θ_i = acos(clamp(u_i · mean)),  tangent = Σ (1/n) θ_i / sin θ_i · (u_i − cos θ_i · mean)  (θ_i < tol skipped)
        stop when ‖tangent‖ < tol
        mean ← normalize(cos‖tangent‖ · mean + sin‖tangent‖ · tangent / ‖tangent‖)
    θ_out = (Σ_i ‖θ_i‖ / N) · mean         (zeros when no input has ‖θ_i‖ > tol)

One pass sums the inputs' Gram matrix (float64, chunk-invariant), the iteration runs on it (the mean
is carried as coefficients on the u_i), a second pass writes Σ k_i θ_i
(workers/kernels/spherical.py). docs/algorithms.md §9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from workers.kernels import spherical
from workers.methods.base import MethodOptions, MethodParameters, Scalar
from workers.methods.slerp import SphericalMethod, copy_through, layout_of, tensor_sums


class KarcherModelParameters(MethodParameters):
    pass


class KarcherParameters(MethodParameters):
    max_iter: int = Field(default=10, ge=0)  # most steps of the iteration
    tol: Scalar = Field(default=1e-5, ge=0)  # stop when the tangent norm is below it; norms <= tol drop out


class KarcherOptions(MethodOptions):
    max_iter: int
    tol: float
    n_models: int  # the models under models:, in config order
    appended_base: bool  # base_model is not listed: it is read as input 0 and counted as the last point

    @property
    def uses_base(self) -> bool:
        return self.appended_base


@dataclass(frozen=True)
class KarcherMethod(SphericalMethod):
    def resolve(self, config) -> KarcherOptions:
        layout = layout_of(config, self.name)
        p = config.parameters
        return KarcherOptions(method=self.name, max_iter=p.max_iter, tol=p.tol, n_models=len(config.models),
                              appended_base=bool(layout.base) and layout.listed_base is None)

    def merge_tensor(self, ctx, inputs, options: KarcherOptions, prepass, out_dtype):
        n = options.n_models + (1 if options.appended_base else 0)

        def points(base, experts) -> list[torch.Tensor]:  # mergekit's order: the models, then the appended base
            return [experts[i] for i in range(options.n_models)] + ([base] if options.appended_base else [])

        if n == 1:
            yield from copy_through(inputs, 0, out_dtype)
            return
        pairs = [(i, j) for i in range(n) for j in range(i, n)]

        def gram(base, experts, r, p):
            return spherical.gram_row_sums([x.view(r, p).float() for x in points(base, experts)], pairs)

        sums = tensor_sums(ctx, inputs, gram).cpu()
        matrix = torch.zeros((n, n), dtype=torch.float64)
        for (i, j), s in zip(pairs, sums):
            matrix[i, j] = matrix[j, i] = s
        k, _ = spherical.karcher_coefficients(matrix, options.max_iter, options.tol)
        coefficients = [ctx.scalar(c) for c in k]
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                if not any(k):  # no input has a norm above tol: mergekit returns zeros
                    out = torch.zeros(experts.shape[1], dtype=out_dtype, device=experts.device)
                else:
                    out = spherical.combine(list(zip(points(base, experts), coefficients)), None, out_dtype=out_dtype)
            yield rows, out


KARCHER = KarcherMethod(name="karcher", parameters=KarcherParameters, model_parameters=KarcherModelParameters,
                        needs_base=False)
