"""mergekit's other generalized task-arithmetic methods: DARE, Model Breadcrumbs and DELLA, each with
a sign consensus (``*_ties``, ``della``) or without (``dare_linear``, ``breadcrumbs``, ``della_linear``).

Per tensor and expert: τ_t = θ_t − θ₀ is sparsified (DARE: a random mask of keep probability
``density``; breadcrumbs: the largest ``gamma`` and the smallest |τ| dropped, ``density`` kept;
DELLA: a random mask whose keep probability rises with |τ|'s rank in its row, from density − ε to
density + ε), rescaled to its l1 norm when ``rescale``, weighted, and mixed (workers/kernels/gta.py).
Random masks come from a counter-based generator keyed by (``random_seed``, tensor, expert, element):
the same seed gives the same bytes for any shard count, chunk size or worker. Magnitude cuts use
the exact selection without sorting of TIES (ties at a cut: lowest flat index ranks first).
Whole-tensor quantities (the cuts, the l1 norms) are found by passes over the row chunks before
any chunk is merged. docs/algorithms.md §8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from workers.kernels import gta, random_masks
from workers.kernels.diagnostics import vote_counts
from workers.kernels.selection import TrimRule
from workers.methods.base import ConfigError, MergeMethod, MethodParameters, Scalar, expert_models, first
from workers.methods.task_arithmetic import TaskVectorOptions, expert_weights
from workers.methods.ties_passes import TrimCuts, top_n_rules

RESCALE_EPS = 1e-7  # mergekit: an l1 norm below this leaves the masked τ unscaled
DEFAULT_GAMMA = 0.01  # breadcrumbs: fraction of the largest |τ| dropped
DEFAULT_EPSILON = 0.15  # della: half-width of the keep probabilities around density


class _TensorParameters(MethodParameters):
    weight: Scalar | None = None  # the expert's weight (multiplies τ̃ before the mix)
    density: Scalar | None = Field(default=None, gt=0, le=1)  # fraction of τ kept (default 1.0: no sparsification)


class _SharedParameters(MethodParameters):
    normalize: bool | None = None  # divide by the (agreeing) weights' sum (default: per method, as mergekit)
    rescale: bool | None = None  # scale each τ̃ to τ's l1 norm (default: per method, as mergekit)
    lam: float = Field(default=1.0, alias="lambda")  # λ on the mixed task vector
    int8_mask: bool | None = None  # mergekit memory option; accepted, no effect


class _Seeded(MethodParameters):
    random_seed: int = 0  # seed of the random masks (mergefleet's: mergekit's masks are unseeded)


class DareModelParameters(_TensorParameters):
    pass


class DareParameters(DareModelParameters, _SharedParameters, _Seeded):
    pass


class BreadcrumbsModelParameters(_TensorParameters):
    gamma: Scalar | None = Field(default=None, ge=0, le=1)  # fraction of the largest |τ| dropped (0.01)


class BreadcrumbsParameters(BreadcrumbsModelParameters, _SharedParameters):
    pass


class DellaModelParameters(_TensorParameters):
    epsilon: Scalar | None = Field(default=None, ge=0, lt=1)  # keep probabilities span density ± epsilon (0.15)


class DellaParameters(DellaModelParameters, _SharedParameters, _Seeded):
    pass


class SparseOptions(TaskVectorOptions):
    sparsification: Literal["random", "magnitude_outliers", "della_magprune"]
    consensus: Literal["sum", "count"] | None
    rescale: bool
    gammas: tuple[float, ...]  # breadcrumbs, per expert
    epsilons: tuple[float, ...]  # della, per expert
    random_seed: int


def _keep_mask(magnitude: torch.Tensor, index: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The elements a trim rule keeps in a chunk: |τ| > thr, and ties up to flat index ``cut``."""
    return (magnitude > thr) | ((magnitude == thr) & (index <= cut))


@dataclass(frozen=True)
class _BreadcrumbRules:
    """Per expert, two top-n rules whose difference is kept: the ``target`` |τ| ranked just below
    the ``upper`` largest (ranks by |τ| descending, ties by lowest flat index)."""

    keep: list[TrimRule]  # top (numel − n_bottom)
    drop: list[TrimRule | None]  # top upper (None: nothing dropped)
    keep_none: list[bool]  # int(density·numel) == 0: nothing kept

    @classmethod
    def find(cls, ctx, inputs, options: SparseOptions) -> _BreadcrumbRules:
        numel = math.prod(inputs.task.shape)
        keep_none, upper, lower = [], [], []
        for density, gamma in zip(options.densities, options.gammas):
            target = int(density * numel) if density < 1 else numel
            n_top = int(gamma * numel) if density < 1 else 0
            n_bottom = max(0, numel - target - n_top)
            upper.append(numel - n_bottom - target)
            lower.append(numel - n_bottom)
            keep_none.append(target == 0)
        keep = top_n_rules(ctx, inputs, [max(1, n) for n in lower])
        drop = top_n_rules(ctx, inputs, [max(1, n) for n in upper])
        return cls(keep, [rule if n > 0 else None for rule, n in zip(drop, upper)], keep_none)

    def masks(self, ctx):
        """A function of (base, experts, index) giving each expert's keep mask, chunk after chunk in
        order (the tie quotas carry from chunk to chunk: one per pass over the tensor)."""
        keep = TrimCuts(ctx, self.keep)
        drop = TrimCuts(ctx, [rule or TrimRule.keep_none() for rule in self.drop])

        def chunk_masks(base, experts, index) -> list[torch.Tensor]:
            keep_cut, drop_cut = keep.for_chunk(base, experts), drop.for_chunk(base, experts)
            index = index - index[:1]  # the cuts are flat indices inside the chunk
            result = []
            for t in range(experts.shape[0]):
                magnitude = (experts[t].float() - base.float()).abs()
                mask = _keep_mask(magnitude, index, keep.thr[t], keep_cut[t])
                if self.drop[t] is not None:
                    mask = mask & ~_keep_mask(magnitude, index, drop.thr[t], drop_cut[t])
                result.append(mask & (not self.keep_none[t]))
            return result

        return chunk_masks


def _della_probabilities(tau: torch.Tensor, shape: tuple[int, ...], rows: tuple[int, int], density: float,
                         epsilon: float) -> torch.Tensor:
    """Keep probabilities of one chunk: density − ε + 2ε·(rank − 1)/(n − 1), the rank of |τ| ascending
    along dim 1 (the whole tensor for a 1-D one), ties by lowest index (a stable sort)."""
    if len(shape) == 1:
        fibers = tau.abs().reshape(1, -1, 1)
    else:
        fibers = tau.abs().reshape(rows[1] - rows[0], shape[1], -1)
    n = fibers.shape[1]
    order = torch.sort(fibers, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=tau.device).view(1, -1, 1).expand_as(order))
    spread = ranks.to(torch.float64) / (n - 1) if n > 1 else torch.zeros_like(ranks, dtype=torch.float64)
    return ((density - epsilon) + spread * (2 * epsilon)).reshape(-1)


@dataclass(frozen=True)
class SparseTaskArithmetic(MergeMethod):
    """One of mergekit's sparsified task-arithmetic methods (the fields say which)."""

    sparsification: str = "random"
    consensus: str | None = None
    default_normalize: bool = False
    default_rescale: bool = True

    def resolve(self, config) -> SparseOptions:
        self.check_base(config)
        p = config.parameters
        experts = expert_models(config, True)
        densities = tuple(first(m.parameters.density, p.density, 1.0) for m in experts)
        gammas = tuple(first(getattr(m.parameters, "gamma", None), getattr(p, "gamma", None), DEFAULT_GAMMA)
                       for m in experts)
        epsilons = tuple(first(getattr(m.parameters, "epsilon", None), getattr(p, "epsilon", None), DEFAULT_EPSILON)
                         for m in experts)
        if self.sparsification == "della_magprune":
            for m, d, e in zip(experts, densities, epsilons):
                if d < 1 and not (0 < d - e and d + e < 1):
                    raise ConfigError(f"model {m.model!r}: {self.name} needs density ± epsilon inside (0, 1), got "
                                      f"density {d} and epsilon {e}; lower epsilon or move density away from 0 and 1")
        return SparseOptions(method=self.name, weights=expert_weights(config), densities=densities, lam=p.lam,
                             normalize=first(p.normalize, self.default_normalize),
                             sparsification=self.sparsification, consensus=self.consensus,
                             rescale=first(p.rescale, self.default_rescale), gammas=gammas, epsilons=epsilons,
                             random_seed=getattr(p, "random_seed", 0))

    def bytes_per_element(self, task) -> int:
        experts = len(task.inputs) - 1
        # per expert: τ, |τ|, the kept τ̃ and its mask; the index, the vote, the elected sign, the sums;
        # DELLA: a row's sort values, ranks and probabilities (bench: calibrate_memory.py)
        della = 16 if self.sparsification == "della_magprune" else 0
        return super().bytes_per_element(task) + experts * 24 + 16 + della

    def chunk_rows(self, task, budget: int, reserve: int) -> int:
        if self.sparsification == "della_magprune" and len(task.shape) == 1:
            return task.shape[0]  # a 1-D tensor is ranked as one row
        return super().chunk_rows(task, budget, reserve)

    def _masks(self, ctx, inputs, options: SparseOptions, rows, base, experts, cuts) -> list[torch.Tensor]:
        """Per expert, the bool mask of the τ it keeps in this chunk (``cuts``: breadcrumbs' masks of this pass)."""
        task = inputs.task
        start = rows[0] * max(1, math.prod(task.shape[1:]))
        index = torch.arange(start, start + experts.shape[1], device=ctx.device)
        if cuts is not None:
            return cuts(base, experts, index)
        masks = []
        for t, density in enumerate(options.densities):
            if density >= 1:
                masks.append(torch.ones_like(index, dtype=torch.bool))
                continue
            key = torch.tensor(random_masks.mask_key(options.random_seed, task.name, t), dtype=torch.int64,
                               device=ctx.device)
            if self.sparsification == "random":
                probability = torch.tensor(density, dtype=torch.float64, device=ctx.device)
            else:
                tau = experts[t].float() - base.float()
                probability = _della_probabilities(tau, task.shape, rows, density, options.epsilons[t])
            masks.append(ctx.compiler.run(random_masks.keep_mask, key, index, probability, numel=index.numel()))
        return masks

    def _scales(self, ctx, inputs, options: SparseOptions, rules) -> list[float]:
        """Per expert, Σ|τ| / Σ|τ̃| over the whole tensor (mergekit's l1 rescale; 1 below RESCALE_EPS).
        Row sums in float64, added exactly (math.fsum): the same for any row chunking."""
        before = [[] for _ in options.densities]
        after = [[] for _ in options.densities]
        row_elements = max(1, math.prod(inputs.task.shape[1:]))
        cuts = rules.masks(ctx) if rules is not None else None
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            masks = self._masks(ctx, inputs, options, rows, base, experts, cuts)
            for t, mask in enumerate(masks):
                magnitude = (experts[t].float() - base.float()).abs().double().reshape(-1, row_elements)
                before[t] += magnitude.sum(1).tolist()
                after[t] += torch.where(mask.reshape(-1, row_elements), magnitude, 0.0).sum(1).tolist()
        scales = []
        for b, a in zip(before, after):
            total, kept = math.fsum(b), math.fsum(a)
            scales.append(1.0 if total < RESCALE_EPS or kept < RESCALE_EPS else total / kept)
        return scales

    def merge_tensor(self, ctx, inputs, options: SparseOptions, prepass, out_dtype):
        sparse = [d < 1 for d in options.densities]
        rules = None
        if self.sparsification == "magnitude_outliers" and any(sparse):
            rules = _BreadcrumbRules.find(ctx, inputs, options)
        scales = self._scales(ctx, inputs, options, rules) if options.rescale and any(sparse) else [1.0] * len(sparse)
        cuts = rules.masks(ctx) if rules is not None else None
        probe = ctx.probe(inputs.task, len(options.weights), elects_sign=options.consensus is not None)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                masks = self._masks(ctx, inputs, options, rows, base, experts, cuts)
                kept, weighted = [], []
                for t, (mask, w) in enumerate(zip(masks, options.weights)):
                    tau = experts[t].float() - base.float()
                    if sparse[t]:
                        tau = torch.where(mask, tau, 0.0)
                    kept.append(tau)
                    if sparse[t] and scales[t] != 1.0:
                        tau = tau * torch.tensor(scales[t], dtype=torch.float32)
                    weighted.append(tau * w)
                agree = gta.agreement(weighted, options.consensus)
                out = gta.mix(base, weighted, list(options.weights), agree, normalize=options.normalize,
                              lam=options.lam, out_dtype=out_dtype)
            if probe:
                with ctx.timer.track("diagnostics"):
                    conflicts = None if agree is None else [(x != 0) & ~a for x, a in zip(weighted, agree)]
                    counts = vote_counts(kept, conflicts, agree or [x != 0 for x in weighted])
                probe.chunk(ctx, rows, base, experts, out, counts)
            yield rows, out
        if probe:
            probe.finish()

_PARAMETERS = {"random": (DareParameters, DareModelParameters),
               "magnitude_outliers": (BreadcrumbsParameters, BreadcrumbsModelParameters),
               "della_magprune": (DellaParameters, DellaModelParameters)}


def _family(name: str, sparsification: str, consensus: str | None, normalize: bool, rescale: bool):
    parameters, model_parameters = _PARAMETERS[sparsification]
    return SparseTaskArithmetic(name=name, parameters=parameters, model_parameters=model_parameters,
                                sparsification=sparsification, consensus=consensus, default_normalize=normalize,
                                default_rescale=rescale)


# mergekit 0.1.5's defaults (merge_methods/registry.py): consensus, normalize, rescale
DARE_TIES = _family("dare_ties", "random", "sum", False, True)
DARE_LINEAR = _family("dare_linear", "random", None, False, True)
BREADCRUMBS = _family("breadcrumbs", "magnitude_outliers", None, False, False)
BREADCRUMBS_TIES = _family("breadcrumbs_ties", "magnitude_outliers", "sum", False, False)
DELLA = _family("della", "della_magprune", "sum", True, True)
DELLA_LINEAR = _family("della_linear", "della_magprune", None, False, True)
