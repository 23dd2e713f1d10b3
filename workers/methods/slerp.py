"""SLERP (mergekit 0.1.5's ``slerp``): spherical interpolation of one tensor from ``base_model``
(t = 0) to the one other model (t = 1), over the whole flattened tensor.

    c = a·b / (‖a‖ ‖b‖) (clamped to [−1, 1]; a norm ≤ 1e-8 counts as 1),  θ = acos c
    |c| > 0.9995:  θ_out = (1 − t)·a + t·b
    otherwise:     θ_out = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

Two passes over the tensor's row chunks: the norms and the dot product (chunk-invariant float64
sums, workers/kernels/spherical.py), then the merge. This module also holds what the spherical
family (slerp, nuslerp, multislerp, karcher) shares: which model is the base and which are the
others, exactly as mergekit counts them, the passes that sum over a whole tensor, and the memory
model. docs/algorithms.md §9.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import model_validator

from workers.kernels import spherical
from workers.methods.base import (
    ConfigError,
    MergeMethod,
    MethodOptions,
    MethodParameters,
    Scalar,
    row_elements,
    task_bytes_per_element,
)
from workers.tensor_io import itemsize

LOG = logging.getLogger(__name__)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log a config warning once per process (resolve runs again for every tensor with its own options)."""
    if message not in _WARNED:
        _WARNED.add(message)
        LOG.warning(message)


# --- which input is what -------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The inputs of a spherical merge as mergekit 0.1.5 counts them: every listed model in order,
    plus ``base_model`` appended when it is not listed; the base is recognised among the models."""

    base: str | None  # base_model, if given
    listed_base: int | None  # index under models: of the base, when it is listed there
    non_base: tuple[int, ...]  # indices under models: of the other models, in config order

    @property
    def n_inputs(self) -> int:
        return len(self.non_base) + (1 if self.base else 0)


def layout_of(config, method: str) -> Layout:
    """The layout of ``config``'s inputs; a model listed twice is refused (as mergekit refuses it)."""
    urls = [m.model for m in config.models]
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ConfigError(f"models: lists {repeated[0]!r} more than once; {method} merges distinct models "
                          "(mergekit refuses duplicate inputs too): list each model once")
    base = config.base_model or None
    listed = urls.index(base) if base in urls else None
    return Layout(base, listed, tuple(i for i, u in enumerate(urls) if u != base))


def model_weights(config, layout: Layout, method: str) -> tuple[float, ...]:
    """Per non-base model: its ``weight``, else ``parameters.weight``; mergekit has no default."""
    top = config.parameters.weight
    weights = []
    for i in layout.non_base:
        w = config.models[i].parameters.weight
        if w is None:
            w = top
        if w is None:
            raise ConfigError(
                f"models.{i}.parameters.weight is required by {method} (mergekit has no default): give each model "
                "besides base_model a weight, or one parameters.weight for all of them")
        weights.append(float(w))
    return tuple(weights)


# --- passes over a tensor ---------------------------------------------------------------------------

def chunk_shape(inputs, rows: tuple[int, int]) -> tuple[int, int]:
    """(rows, elements per row) of one row chunk of the tensor (a 0-d tensor is one row of one)."""
    return rows[1] - rows[0], math.prod(inputs.task.shape[1:])


def tensor_sums(ctx, inputs, per_row: Callable) -> torch.Tensor:
    """Whole-tensor sums, the same bits for any chunking: ``per_row(base, experts, r, p)`` gives the
    chunk's per-row values [r, ...] (float64), summed over every row by a ``RowTree``."""
    tree, last = spherical.RowTree(), None
    for rows in inputs.ranges:
        base, experts = inputs.load(rows)
        r, p = chunk_shape(inputs, rows)
        with ctx.timer.track("kernel"):
            last = per_row(base, experts, r, p)
            tree.add(last, rows[0])
    with ctx.timer.track("kernel"):
        return tree.total(like=last.new_zeros(last.shape[1:]))


def norm_and_dot_rows(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """[..., 3] float64: Σ v0², Σ v1², Σ v0·v1 over the last axis (pairwise, chunk-invariant)."""
    return torch.stack([spherical.row_sums(a * b) for a, b in ((v0, v0), (v1, v1), (v0, v1))], dim=-1)


def delta(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """x − base in float32 (x itself, upcast, without a base), as the merge pass computes it."""
    return x.float() if base is None else x.float() - base.float()


# --- the family's memory model ------------------------------------------------------------------------

@dataclass(frozen=True)
class SphericalMethod(MergeMethod):
    """A spherical method's chunk working set, per element: two sets of raw read buffers, every
    input upcast to float32 (the differences to the base) and to float64 (for the sums), up to three
    float64 products with their pairwise trees (3·8 + 3·8 / 2 + …), the float32 merge and the output."""

    def bytes_per_element(self, task) -> int:
        n = len(task.inputs)
        in_size = max(itemsize(i.dtype) for i in task.inputs)
        return 2 * n * in_size + (4 + 8) * n + 2 * 3 * 8 + 4 + itemsize(task.out_dtype)

    def held_bytes(self, task) -> int:
        """Bytes held for the whole tensor beside its chunks (nuslerp's per-column partial sums)."""
        return 0

    def chunk_rows(self, task, budget: int, reserve: int) -> int:
        rows = task.shape[0] if task.shape else 1
        room = max(0, budget - self.held_bytes(task))
        return max(1, min(rows, room // (self.bytes_per_element(task) * row_elements(task.shape))))

    def tensor_memory(self, task, options, budget: int) -> int:
        if task.action != "merge":
            return task_bytes_per_element(task) * task.chunk_rows * row_elements(task.shape)
        return self.bytes_per_element(task) * task.chunk_rows * row_elements(task.shape) + self.held_bytes(task)


def copy_through(inputs, x_index: int, out_dtype: torch.dtype):
    """Yield the chunks of one input unchanged (cast): mergekit's answer for a single input."""
    for rows in inputs.ranges:
        _, experts = inputs.load(rows)
        yield rows, experts[x_index].to(out_dtype)


# --- slerp --------------------------------------------------------------------------------------------

class SlerpModelParameters(MethodParameters):
    @model_validator(mode="before")
    @classmethod
    def _no_model_t(cls, data):
        if isinstance(data, dict) and "t" in data:
            raise ValueError(
                "t under a model's parameters: slerp's t is one value for the whole merge (mergekit reads it only "
                "from the top-level parameters and silently ignores a per-model t); move it to parameters: t")
        return data


class SlerpParameters(MethodParameters):
    t: Scalar | None = None  # interpolation fraction: 0 = base_model, 1 = the other model (required)


class SlerpOptions(MethodOptions):
    t: float

    @property
    def uses_base(self) -> bool:
        return True


@dataclass(frozen=True)
class SlerpMethod(SphericalMethod):
    def resolve(self, config) -> SlerpOptions:
        layout = layout_of(config, self.name)
        if not layout.base:
            raise ConfigError(
                "merge_method slerp needs base_model: the model at t = 0 (mergekit: slerp requires a base input); set "
                "base_model to one of the two models")
        if layout.n_inputs != 2:
            models = [m.model for m in config.models]
            raise ConfigError(
                f"slerp interpolates exactly two models, base_model (t = 0) and one other (t = 1); this config has "
                f"{layout.n_inputs} (models: {models}, base_model: {layout.base!r}). List exactly one model besides "
                "base_model under models: (use multislerp or karcher for more)")
        t = config.parameters.t
        if t is None:
            raise ConfigError("parameters.t is required by slerp (mergekit has no default): the interpolation fraction, "
                              "0 = base_model, 1 = the other model, e.g. parameters: {t: 0.5}")
        if not math.isfinite(t):
            raise ConfigError(f"parameters.t must be a finite number, got {t}")
        if not 0.0 <= t <= 1.0:
            warn_once(f"slerp t = {t} lies outside [0, 1]: the result extrapolates beyond the two models "
                      "(mergekit accepts it too)")
        return SlerpOptions(method=self.name, t=float(t))

    def merge_tensor(self, ctx, inputs, options: SlerpOptions, prepass, out_dtype):
        def per_row(base, experts, r, p):
            return norm_and_dot_rows(base.view(r, p).float().double(), experts[0].view(r, p).float().double())

        sums = [float(s) for s in tensor_sums(ctx, inputs, per_row).tolist()]
        ca, cb, _ = spherical.slerp_coefficients(*sums, options.t)
        ctx.record({"name": inputs.task.name, "elements": math.prod(inputs.task.shape),
                    "slerp_angle": math.acos(spherical.slerp_cosine(*sums))})
        ca, cb = ctx.scalar(ca), ctx.scalar(cb)
        for rows in inputs.ranges:
            base, experts = inputs.load(rows)
            with ctx.timer.track("kernel"):
                out = spherical.combine([(base, ca), (experts[0], cb)], None, out_dtype=out_dtype)
            yield rows, out


SLERP = SlerpMethod(name="slerp", parameters=SlerpParameters, model_parameters=SlerpModelParameters)
