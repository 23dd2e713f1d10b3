"""What a merge method is: one frozen object, registered in ``workers/methods/__init__.py``.

A method holds its name, its parameters (pydantic models of the keys it accepts at the top level
and per model), how it resolves them into ``MethodOptions`` (every value a kernel needs, no
defaults left to guess), its memory model, its tensor body (``merge_tensor``: pure kernels over
the chunks of one tensor), and optional hooks: a model-wide pre-pass, a shard body of its own with
extra outputs, a publish step. ``workers/methods/linear.py`` is the smallest complete example.
The definitions of the methods are in docs/algorithms.md.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from workers.results import OutputFile, ScanResult, ShardResult
from workers.shard_body import ShardBody
from workers.tensor_io import itemsize

LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from workers.chunks import MergeInputs, ShardContext
    from workers.specs import ShardSpec, TensorTask


class ConfigError(ValueError):
    """The config is invalid; the message names the key and the fix."""


def _one_number(value):
    if isinstance(value, (list, dict)):
        raise ValueError("gradient or filtered parameters (lists) are not supported; give one number")
    return value


Scalar = Annotated[float, BeforeValidator(_one_number)]  # a number; mergekit's gradient lists are refused


class MethodParameters(BaseModel):
    """Base of a method's parameter models: frozen, unknown keys refused, ``lambda`` by its alias."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class MethodOptions(BaseModel):
    """Base of a method's resolved options, as the plan stores them and the shard tasks receive them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str  # the registered method's name

    @property
    def uses_base(self) -> bool:
        """Whether the base model is read as the first input of every merged tensor."""
        return False

    @property
    def tensor_method(self) -> str:
        """The method named in the tensor table for merged tensors."""
        return self.method


def warn_unused_density(config, method: str) -> None:
    """A per-model ``density`` reaches a method that does not trim: say so (mergekit ignores it silently)."""
    given = [m.model for m in config.models if getattr(m.parameters, "density", None) is not None]
    if given:
        LOG.warning("%s does not trim: the density given to %s has no effect (use merge_method: ties to trim)",
                    method, given)


def expert_models(config, uses_base: bool) -> tuple:
    """The `models:` entries merged as experts. With a base model, an entry naming the base itself is
    the base, not one more weighted expert (mergekit's README lists the base this way)."""
    if not uses_base or not config.base_model:
        return tuple(config.models)
    experts = tuple(m for m in config.models if m.model != config.base_model)
    if not experts:
        raise ConfigError(f"models: lists only the base model {config.base_model!r}; list the experts to merge into it")
    return experts


def first(*values):
    """The first value that is not None (a per-model value, then the top-level one, then the default)."""
    return next(v for v in values if v is not None)


MERGEKIT_PARAMETERS = frozenset({  # every parameter a mergekit 0.1.5 method takes (top level or per model)
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "select_topk", "t",
    "nuslerp_flatten", "nuslerp_row_wise", "filter_wise", "max_iter", "tol", "eps", "r", "alpha", "scale",
})


def unknown_key(key: str, name: str, valid: list[str], *, mergekit_has: bool) -> str:
    """The message for a refused key: whether mergekit has it (not supported here yet) or neither
    does (a typo), and the nearest valid key."""
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    why = ("mergekit has it; mergefleet does not support it yet" if mergekit_has
           else "neither mergekit nor mergefleet has it")
    hint = f"; did you mean {near[0]!r}?" if near else " (see the config reference in README.md)"
    return f"unknown key {key!r}: {why}{hint}"


def describe_errors(exc: ValidationError, path: str, method: str, owners: Callable[[str], list[str]],
                    valid: list[str] = ()) -> str:
    """One message naming every invalid key under ``path``; a key another method accepts says which."""
    messages = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join([path, *loc])
        if error["type"] == "extra_forbidden":
            others = [m for m in owners(loc[-1]) if m != method] if len(loc) == 1 else []
            if others:
                messages.append(f"{key} is an option of {' / '.join(others)}, not of {method}; "
                                f"it needs merge_method: {others[0]}")
            else:
                messages.append(unknown_key(key, loc[-1], list(valid), mergekit_has=loc[-1] in MERGEKIT_PARAMETERS))
        elif not loc:  # a check across keys: the message names them
            messages.append(error["msg"].removeprefix("Value error, "))
        else:
            messages.append(f"{key}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(messages)


def default_bytes_per_element(n_inputs: int, in_itemsize: int, out_itemsize: int) -> int:
    """Peak working-set bytes per tensor element while merging one chunk.

    Counts two sets of raw read buffers (this chunk and the next tensor's, read ahead), the bucket
    ids (int32) plus a byte per input, three float32 per-element temporaries and the cast output.
    The compiled kernels hold less (no temporaries); the eager ones, which run small chunks or
    everything where nothing compiles, about this much.
    """
    return 2 * n_inputs * in_itemsize + 5 * n_inputs + 3 * 4 + out_itemsize


def task_bytes_per_element(task: TensorTask) -> int:
    """``default_bytes_per_element`` of one tensor's inputs and output."""
    return default_bytes_per_element(len(task.inputs), max(itemsize(i.dtype) for i in task.inputs),
                                     itemsize(task.out_dtype))


def keys_of(parameters: type[BaseModel]) -> list[str]:
    """The keys a parameter model accepts, as a config spells them (aliases such as ``lambda``)."""
    return [info.alias or name for name, info in parameters.model_fields.items()]


def row_elements(shape: tuple[int, ...]) -> int:
    return max(1, math.prod(shape[1:]))


@dataclass(frozen=True)
class Prepass:
    """What a method's model-wide pre-pass found: ``shard_data`` goes to every shard spec
    (``spec.prepass``), ``state`` is kept in the run state so a resumed run skips the scans,
    ``record`` goes into the manifest's extra."""

    shard_data: Any
    state: dict
    record: dict


@dataclass(frozen=True)
class Published:
    """What a method's publish hook adds to the manifest: tensor-table rows, files and extra records."""

    rows: list[dict] = field(default_factory=list)
    files: list[OutputFile] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


RunScans = Callable[[Any], list[ScanResult]]  # runs one scan (workers.shard_task.Scan) over every shard


@dataclass(frozen=True)
class MergeMethod:
    """A merge method. Subclasses implement ``resolve`` and ``merge_tensor``; the other hooks have
    defaults that fit a plain merge (one output file per shard, no pre-pass, nothing extra)."""

    name: str
    parameters: type[MethodParameters]  # the keys it accepts under `parameters:`
    model_parameters: type[MethodParameters]  # the keys it accepts under each model's `parameters:`
    needs_base: bool = True  # whether `base_model:` is required
    output_dir: str = ""  # folder of the output (relative to its root) the merged shards go to
    per_tensor_parameters: bool = True  # gradients and filters may give each tensor its own parameters

    # --- config ---------------------------------------------------------------------------
    def model_parameters_for(self, parameters: MethodParameters) -> type[MethodParameters]:
        """The per-model parameter model, given the validated top-level parameters."""
        return self.model_parameters

    def validate_parameters(self, raw: dict, path: str, owners: Callable[[str], list[str]]) -> MethodParameters:
        """The top-level parameters, validated; errors name the key under ``path``."""
        try:
            return self.parameters.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, path, self.name, owners, keys_of(self.parameters))) from None

    def check_base(self, config) -> None:
        if self.needs_base and not config.base_model:
            raise ConfigError(f"merge_method {self.name} needs base_model: the pre-trained model the experts were tuned from")

    def resolve(self, config) -> MethodOptions:
        """Every value the kernels need, from a validated config (pipeline.config.MergeConfig)."""
        raise NotImplementedError

    # --- plan -------------------------------------------------------------------------------
    def bytes_per_element(self, task: TensorTask) -> int:
        """Working-set bytes per element of one merged chunk."""
        return task_bytes_per_element(task)

    def chunk_rows(self, task: TensorTask, budget: int, reserve: int) -> int:
        """Rows of a merged tensor processed at once within ``budget`` bytes of tensors."""
        rows = task.shape[0] if task.shape else 1
        return max(1, min(rows, budget // (self.bytes_per_element(task) * row_elements(task.shape))))

    def tensor_memory(self, task: TensorTask, options: MethodOptions, budget: int) -> int:
        """The most bytes of tensors a task holds while it makes this (merged or copied) tensor."""
        per_element = self.bytes_per_element(task) if task.action == "merge" else task_bytes_per_element(task)
        return per_element * task.chunk_rows * row_elements(task.shape)

    def summary(self, plan) -> dict:
        """What `mergefleet plan` shows beyond the shards (Twin: the experts, the largest matrix)."""
        return {}

    # --- run --------------------------------------------------------------------------------
    def prepass(self, options: MethodOptions, plan, run_scans: RunScans, saved: dict | None) -> Prepass | None:
        """A model-wide pass before the shards merge (None: the method has none). ``saved``: the
        state a previous attempt of this run stored, to be reused instead of scanning again."""
        return None

    def shard_body(self, spec: ShardSpec) -> ShardBody:
        """How one shard's merged tensors are made and written (default: ``merge_tensor`` into the shard)."""
        return ShardBody(self, spec)

    def merge_tensor(self, ctx: ShardContext, inputs: MergeInputs, options: MethodOptions, prepass: Any,
                     out_dtype: torch.dtype) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        """Yield (rows, merged flat chunk in ``out_dtype``) for one tensor; a chunk's tensor is
        reused for the next chunk, so consume it before asking for the next."""
        raise NotImplementedError

    # --- publish ----------------------------------------------------------------------------
    def publish_inputs(self, plan) -> Any:
        """Anything the publish hook needs that can be prepared while the shards run (in a thread)."""
        return None

    def publish(self, plan, results: list[ShardResult], prepared: Any) -> Published:
        """Files and records beyond the shards, their index and side files (written before the manifest)."""
        return Published()
