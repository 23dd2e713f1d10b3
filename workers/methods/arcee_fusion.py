"""Arcee Fusion (mergekit 0.1.5's ``arcee_fusion``): take the other model's value where its change
from the base is important, by a dynamic (quartile) threshold.

    p = softmax(θ₁) + 1e-8,  q = softmax(θ₀) + 1e-8          (along the last dimension)
    KL = Σ_last p · log(p / q)                               (one value per row of the last dim)
    I  = |θ₁ − θ₀| · KL                                      (importance, per element)
    thr = Q₂ + 1.5 · (Q₃ − Q₁),  Q_q = the (⌊q·(numel − 1)⌋ + 1)-th smallest I
    θ  = θ₁ where I ≥ thr, else θ₀

The KL values (one per row of the last dimension; the whole tensor for a 1-D one), the quartiles
(exact order statistics over every row chunk, workers/kernels/order64.py) and so the threshold
are computed over the whole tensor before any chunk is merged, in float64. mergekit samples one
million values (with replacement, unseeded) for the quartiles of a larger tensor; mergefleet
always uses every value. docs/algorithms.md §10 (Arcee Fusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.chunks import chunk_values
from workers.kernels.order64 import kth_smallest
from workers.kernels.tree_sum import TreeSum, pairwise_sum
from workers.methods.base import ConfigError, MergeMethod, MethodOptions, MethodParameters
from workers.methods.model_stock import bytes_with_float64, distinct_experts, flat_start

SOFTMAX_EPS = 1e-8  # added to both softmaxes before the KL
IQR_FACTOR = 1.5
QUARTILES = (0.25, 0.5, 0.75)


class ArceeFusionModelParameters(MethodParameters):
    pass


class ArceeFusionParameters(MethodParameters):
    pass


class ArceeFusionOptions(MethodOptions):
    @property
    def uses_base(self) -> bool:
        return True


def quartile_ranks(numel: int) -> list[int]:
    """1-based ranks of mergekit's quartiles: index ⌊q·(numel − 1)⌋ of the sorted values."""
    return [(numel - 1) * num // 4 + 1 for num in (1, 2, 3)]


def _softmax_rows(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / pairwise_sum(e)[..., None]


def _kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p * torch.log(p / q)


def _pair(base: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ₀, θ₁) of a chunk in float64 (from their float32 values)."""
    return base.float().double(), experts[0].float().double()


@dataclass(frozen=True)
class ArceeFusionMethod(MergeMethod):
    def resolve(self, config) -> ArceeFusionOptions:
        self.check_base(config)
        experts = distinct_experts(config, self.name)
        if len(experts) != 1:
            raise ConfigError(
                f"arcee_fusion fuses exactly one model into base_model (mergekit: exactly 2 inputs counting the "
                f"base); got {len(experts)} besides the base. List one model under models:")
        return ArceeFusionOptions(method=self.name)

    def bytes_per_element(self, task) -> int:
        return bytes_with_float64(task, 5)  # θ₀, θ₁, the softmaxes, the KL terms; importance keys and digits


    # --- the whole-tensor statistics ---------------------------------------------------------------
    def _row_kl(self, ctx, inputs, width: int) -> torch.Tensor:
        """[rows of the last dim] KL, each row inside one chunk (tensors of 2 or more dims)."""
        kls = []
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                x0, x1 = (x.view(-1, width) for x in _pair(base, experts))
                p, q = _softmax_rows(x1) + SOFTMAX_EPS, _softmax_rows(x0) + SOFTMAX_EPS
                kls.append(pairwise_sum(_kl_terms(p, q)))
        return torch.cat(kls)

    def _vector_kl(self, ctx, inputs) -> torch.Tensor:
        """The one KL of a 1-D (or 0-d) tensor, its softmax over every chunk: max, Σ exp, Σ terms."""
        task = inputs.task
        m0 = m1 = None
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            x0, x1 = _pair(base, experts)
            m0 = x0.max() if m0 is None else torch.maximum(m0, x0.max())
            m1 = x1.max() if m1 is None else torch.maximum(m1, x1.max())
        s0, s1 = TreeSum(), TreeSum()
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            x0, x1 = _pair(base, experts)
            start = flat_start(task, rows)
            s0.add(start, torch.exp(x0 - m0))
            s1.add(start, torch.exp(x1 - m1))
        s0, s1 = s0.total(), s1.total()
        terms = TreeSum()
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            x0, x1 = _pair(base, experts)
            p, q = torch.exp(x1 - m1) / s1 + SOFTMAX_EPS, torch.exp(x0 - m0) / s0 + SOFTMAX_EPS
            terms.add(flat_start(task, rows), _kl_terms(p, q))
        return terms.total()

    def merge_tensor(self, ctx, inputs, options: ArceeFusionOptions, prepass, out_dtype):
        task = inputs.task
        numel = math.prod(task.shape)
        if numel == 0:
            for rows in inputs.ranges:
                _, experts = inputs.load(rows)
                yield rows, inputs.merged_buffer(experts, out_dtype)
            return
        width = task.shape[-1] if len(task.shape) >= 2 else 0
        kl = self._row_kl(ctx, inputs, width) if width else self._vector_kl(ctx, inputs)

        def importance(rows, base, experts) -> torch.Tensor:
            x0, x1 = _pair(base, experts)
            diff = (x1 - x0).abs()
            if not width:
                return diff * kl
            first = flat_start(task, rows) // width
            return (diff.view(-1, width) * kl[first:first + diff.numel() // width, None]).view(-1)

        chunks = chunk_values(ctx, inputs, importance)
        q1, q2, q3 = (r.value for r in kth_smallest(chunks, quartile_ranks(numel)))
        threshold = q2 + IQR_FACTOR * (q3 - q1)
        single = next(chunks()) if len(inputs.ranges) == 1 else None  # served from the pass above
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                take = (single if single is not None else importance(rows, base, experts)) >= threshold
                out = inputs.merged_buffer(experts, out_dtype).copy_(torch.where(take, experts[0].float(),
                                                                                 base.float()))
            yield rows, out


ARCEE_FUSION = ArceeFusionMethod(name="arcee_fusion", parameters=ArceeFusionParameters,
                                 model_parameters=ArceeFusionModelParameters)
