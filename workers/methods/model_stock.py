"""Model Stock (mergekit 0.1.5's ``model_stock``): interpolate between the base and the experts'
average by a ratio t taken from the angle between the experts' task vectors.

    cos   = mean over pairs a < b of clamp(⟨τ_a, τ_b⟩ / max(‖τ_a‖‖τ_b‖, 1e-6), −1, 1)
    t     = N·cos / (1 + (N−1)·cos), or 0 where |1 + (N−1)·cos| < 1e-6
    θ     = t · (Σ_t θ_t / N) + (1 − t) · θ₀

per tensor (``filter_wise: false``, the default) or per row of the last dimension
(``filter_wise: true``; a 1-D tensor is then one row, as mergekit unsqueezes it). The dot products
of a whole tensor are summed over every row chunk before any chunk is merged (one extra pass), in
float64 along a fixed tree (workers/kernels/tree_sum.py), so the bytes never depend on the
chunking. docs/algorithms.md §10 (Model Stock).

This module also holds the config helpers the other mergekit methods here share
(``distinct_experts``, ``refuse_duplicates``, ``shared_only``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import model_validator

from workers.kernels.tree_sum import TreeSum, pairwise_sum
from workers.methods.base import (
    ConfigError,
    MergeMethod,
    MethodOptions,
    MethodParameters,
    default_bytes_per_element,
    expert_models,
    row_elements,
)
from workers.tensor_io import itemsize

COS_NORM_FLOOR = 1e-6  # mergekit clamps ‖τ_a‖‖τ_b‖ to at least this before dividing
SINGULAR = 1e-6  # |1 + (N−1)·cos| below this keeps the base (t = 0)


# --- config helpers shared by the mergekit methods of this family -------------------------------

def refuse_duplicates(config, method: str) -> None:
    """A model listed twice under `models:` is refused, as mergekit refuses duplicate merge inputs."""
    seen: dict[str, int] = {}
    for i, m in enumerate(config.models):
        if m.model in seen:
            raise ConfigError(f"models.{i}: {m.model!r} is already models.{seen[m.model]}; {method} (like mergekit, "
                              "which refuses duplicate merge inputs) takes each model once: remove the duplicate")
        seen[m.model] = i


def distinct_experts(config, method: str) -> tuple:
    """The experts: the `models:` entries other than base_model (which mergekit counts once, as the
    base), duplicates refused."""
    refuse_duplicates(config, method)
    return expert_models(config, True)


def shared_only(data, keys: tuple[str, ...], method: str):
    """Refuse, under a model's `parameters:`, a key mergekit reads only from the top-level
    `parameters:` (it would silently ignore it there)."""
    if isinstance(data, dict):
        for key in keys:
            if key in data:
                raise ValueError(f"{key} is a top-level parameter of {method}: mergekit reads it only from the "
                                 f"`parameters:` of the merge and ignores it under a model; move {key} there")
    return data


def bytes_with_float64(task, float64_per_input: int, extra: int = 0) -> int:
    """The default working set plus ``float64_per_input`` float64 temporaries per merged input."""
    n = len(task.inputs)
    return (default_bytes_per_element(n, max(itemsize(i.dtype) for i in task.inputs), itemsize(task.out_dtype))
            + 8 * float64_per_input * n + extra)


def flat_start(task, rows: tuple[int, int]) -> int:
    """Flat index of the first element of a row chunk."""
    return rows[0] * row_elements(task.shape) if task.shape else 0


# --- the method ---------------------------------------------------------------------------------

class ModelStockModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        return shared_only(data, ("filter_wise",), "model_stock")


class ModelStockParameters(MethodParameters):
    filter_wise: bool = False  # one t per row of the last dimension instead of one per tensor


class ModelStockOptions(MethodOptions):
    filter_wise: bool
    n_experts: int  # N, the models besides the base

    @property
    def uses_base(self) -> bool:
        return True


def stock_ratio(gram: list[list[torch.Tensor]], n: int) -> torch.Tensor:
    """t from the experts' Gram entries ⟨τ_a, τ_b⟩ (a ≤ b; float64, one value per filter)."""
    norms = [torch.sqrt(gram[a][a]) for a in range(n)]
    cosines = [(gram[a][b] / (norms[a] * norms[b]).clamp(min=COS_NORM_FLOOR)).clamp(-1, 1)
               for a in range(n) for b in range(a + 1, n)]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos),
                                                                            denominator))


def _taus(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return experts.float().double() - base.float().double()


def _interpolate(base: torch.Tensor, experts: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """t·mean(θ_t) + (1 − t)·θ₀ in float32 (t broadcast over [filters, L] or a 0-d scalar)."""
    average = experts[0].float()
    for x in experts[1:]:
        average = average + x.float()
    average = average / experts.shape[0]
    w0 = base.float()
    if t.dim():
        shape = (t.shape[0], -1)
        merged = (t.float()[:, None] * average.view(shape) + (1 - t).float()[:, None] * w0.view(shape)).view(-1)
    else:
        merged = t.float() * average + (1 - t).float() * w0
    return out.copy_(merged)


@dataclass(frozen=True)
class ModelStockMethod(MergeMethod):
    def resolve(self, config) -> ModelStockOptions:
        self.check_base(config)
        experts = distinct_experts(config, self.name)
        if len(experts) < 2:
            raise ConfigError(
                f"model_stock needs at least 2 models besides base_model (mergekit: at least 3 inputs counting the "
                f"base); got {len(experts)}. List more fine-tuned models, or use merge_method: task_arithmetic")
        return ModelStockOptions(method=self.name, filter_wise=config.parameters.filter_wise, n_experts=len(experts))

    def bytes_per_element(self, task) -> int:
        return bytes_with_float64(task, 3, extra=8)  # τ, Σ products, the halving's copies; float32 average

    def _whole_gram(self, ctx, inputs, n: int) -> list[list[torch.Tensor]]:
        """⟨τ_a, τ_b⟩ over the whole tensor, a ≤ b: one pass over the row chunks, fixed-tree sums."""
        sums = [TreeSum() for _ in range(n)]
        like = None
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                tau = _taus(base, experts)
                like = tau
                start = flat_start(inputs.task, rows)
                for a in range(n):
                    sums[a].add(start, tau[a:] * tau[a])
        gram: list[list] = [[None] * n for _ in range(n)]
        for a in range(n):
            row = sums[a].total(like[a:])
            for b in range(a, n):
                gram[a][b] = row[b - a]
        return gram

    def merge_tensor(self, ctx, inputs, options: ModelStockOptions, prepass, out_dtype):
        shape, n = inputs.task.shape, options.n_experts
        per_filter = options.filter_wise and len(shape) >= 2 and math.prod(shape) > 0
        t = None if per_filter else stock_ratio(self._whole_gram(ctx, inputs, n), n)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                if per_filter:
                    tau = _taus(base, experts).view(n, -1, shape[-1])
                    gram: list[list] = [[None] * n for _ in range(n)]
                    for a in range(n):
                        row = pairwise_sum(tau[a:] * tau[a])
                        for b in range(a, n):
                            gram[a][b] = row[b - a]
                    t = stock_ratio(gram, n)
                out = _interpolate(base, experts, t, inputs.merged_buffer(experts, out_dtype))
            yield rows, out


MODEL_STOCK = ModelStockMethod(name="model_stock", parameters=ModelStockParameters,
                               model_parameters=ModelStockModelParameters)
