"""Twin-Merging as a method: a shared expert θ* (any plain registered merge, nested under
``parameters.shared``) plus, per expert, low-rank factors of its exclusive part v_t = θ_t − θ*.

The plan is the shared merge's (shards by parameter name, files under ``shared/``) with chunks
sized for the twin working set; each shard's body (workers/methods/twin_shard.py) writes θ* and
every expert's factor file in one pass; the publish hook (workers/methods/twin_publish.py) writes
the factor indexes, PEFT adapters and the manifest's ``extra.twin``. docs/algorithms.md §5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SerializeAsAny, ValidationError, model_validator

from workers.methods import twin_publish
from workers.methods.base import (
    ConfigError,
    MergeMethod,
    MethodOptions,
    MethodParameters,
    describe_errors,
    expert_models,
    row_elements,
)
from workers.methods.twin_shard import (
    TWIN_MATRIX_COPIES,
    TwinBody,
    held_matrix_bytes,
    stream_bytes_per_element,
    tensor_memory,
)
from workers.tensor_io import itemsize

SHARED_LAMBDA = 0.29  # the Twin-Merging paper's λ for a task-arithmetic shared expert
DEFAULT_RANK_RATIO = 0.1  # the paper's default rank, as a fraction of min(m, n)
RANK_RULES = ("rank", "rank_ratio", "energy")


class SharedMerge(MethodParameters):
    """The merge that makes θ*: a plain registered method and its parameters."""

    merge_method: str = "task_arithmetic"  # linear | task_arithmetic | ties
    parameters: SerializeAsAny[MethodParameters]  # that method's parameters (task_arithmetic: λ defaults to 0.29)


class TwinParameters(MethodParameters):
    shared: SharedMerge  # the shared expert's merge (default task_arithmetic with λ 0.29)
    rank: int | None = Field(default=None, ge=1)  # fixed truncation rank of every 2-D exclusive tensor (capped at min(m, n))
    rank_ratio: float | None = Field(default=None, gt=0, le=1)  # rank = max(1, int(ratio·min(m, n))) (default 0.1)
    energy: float | None = Field(default=None, gt=0, le=1)  # smallest rank keeping this fraction of ‖v‖²_F
    svd: Literal["auto", "exact", "randomized"] = "auto"  # auto: randomized for large matrices at small rank

    @model_validator(mode="after")
    def _one_rank_rule(self):
        given = [k for k in RANK_RULES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"parameters {' and '.join(given)} both set the twin rank; give one of rank, rank_ratio, energy")
        return self


class TwinOptions(MethodOptions):
    shared: SerializeAsAny[MethodOptions]  # the resolved shared merge
    experts: tuple[str, ...]  # path-safe expert names, in config order (the router's task names)
    rank: int | None  # exactly one of rank, rank_ratio, energy (workers.kernels.twin.choose_rank)
    rank_ratio: float | None
    energy: float | None
    svd: str  # auto | exact | randomized

    @property
    def uses_base(self) -> bool:
        return self.shared.uses_base

    @property
    def tensor_method(self) -> str:
        return self.shared.tensor_method

    def factor_file(self, expert: str, shard_index: int, n_shards: int) -> str:
        """Path of an expert's factor file for one shard, relative to the output root."""
        return f"{twin_publish.EXPERTS_DIR}/{expert}/factors-{shard_index + 1:05d}-of-{n_shards:05d}.safetensors"


def _registry():
    import workers.methods as registry  # the registry imports this module

    return registry


def expert_names(urls: list[str]) -> tuple[str, ...]:
    """Stable, path-safe names from the models' URLs: the last path component (the directory of a
    ``.safetensors`` URL), characters outside [A-Za-z0-9._-] replaced by '_'. Names that collide get
    ``-<index in the config>`` appended."""
    names = []
    for url in urls:
        parts = [p for p in re.split(r"[/\\]", url.split("://", 1)[-1]) if p]
        if parts and parts[-1].endswith(".safetensors") and len(parts) > 1:
            parts.pop()
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", parts[-1] if parts else "").strip("._-") or "expert"
        names.append(name)
    counts = {n: names.count(n) for n in names}
    unique = [f"{n}-{i}" if counts[n] > 1 else n for i, n in enumerate(names)]
    taken = set()
    for i, n in enumerate(unique):  # a suffixed name may still equal another model's plain name
        while n in taken:
            n = f"{n}-{i}"
        unique[i] = n
        taken.add(n)
    return tuple(unique)


@dataclass(frozen=True)
class TwinMethod(MergeMethod):
    # --- config ---------------------------------------------------------------------------
    def validate_parameters(self, raw: dict, path: str, owners) -> TwinParameters:
        misplaced = sorted(k for k in raw if k != "shared" and k not in self.parameters.model_fields and owners(k))
        if misplaced:
            raise ConfigError(f"{path}.{misplaced[0]} of a twin run belongs to its shared merge; "
                              f"move it to {path}.shared.parameters.{misplaced[0]}")
        try:
            return self.parameters.model_validate({**raw, "shared": self._shared(raw.get("shared"), f"{path}.shared")})
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, path, self.name, owners)) from None

    def _shared(self, raw, path: str) -> SharedMerge:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"merge_method", "parameters"})
        if unknown:
            raise ConfigError(f"unknown key '{path}.{unknown[0]}'; the shared merge takes merge_method and parameters")
        registry = _registry()
        name = raw.get("merge_method", "task_arithmetic")
        method = registry.get_method(name)
        if isinstance(method, TwinMethod):
            raise ConfigError(f"{path}.merge_method: the shared expert needs a plain merge, not {name}")
        nested = dict(raw.get("parameters") or {})
        twin_keys = [k for k in nested if k in self.parameters.model_fields]
        if twin_keys:
            raise ConfigError(f"{path}.parameters.{twin_keys[0]} is a Twin-Merging option; give it as "
                              f"{path.rsplit('.', 1)[0]}.{twin_keys[0]} (the shared merge is a plain merge)")
        if name == "task_arithmetic" and not {"lambda", "lam"} & set(nested):
            nested["lambda"] = SHARED_LAMBDA
        return SharedMerge(merge_method=name, parameters=registry.validate_parameters(method, nested, f"{path}.parameters"))

    def model_parameters_for(self, parameters: TwinParameters):
        return _registry().get_method(parameters.shared.merge_method).model_parameters

    def resolve(self, config) -> TwinOptions:
        shared = config.parameters.shared
        method = _registry().get_method(shared.merge_method)
        if method.needs_base and not config.base_model:
            raise ConfigError(f"merge_method twin with a {shared.merge_method} shared merge needs base_model: "
                              "the pre-trained model the experts were tuned from")
        shared_config = config.model_copy(update={
            "merge_method": shared.merge_method, "parameters": shared.parameters,
            "base_model": config.base_model if method.needs_base else None})
        p = config.parameters
        rules = {k: getattr(p, k) for k in RANK_RULES}
        if all(v is None for v in rules.values()):
            rules["rank_ratio"] = DEFAULT_RANK_RATIO
        shared_options = method.resolve(shared_config)
        experts = expert_models(shared_config, shared_options.uses_base)
        return TwinOptions(method=self.name, shared=shared_options, experts=expert_names([m.model for m in experts]),
                           svd=p.svd, **rules)

    # --- plan -------------------------------------------------------------------------------
    def bytes_per_element(self, task) -> int:
        return stream_bytes_per_element(task)

    def chunk_rows(self, task, budget: int, reserve: int) -> int:
        """Row chunks that fit ``budget`` next to the whole matrix a 2-D tensor's SVD holds; refuses
        a tensor whose matrix cannot fit at all."""
        held = held_matrix_bytes(task.shape)
        row_bytes = stream_bytes_per_element(task) * row_elements(task.shape)
        if held + row_bytes > budget:
            m, n = task.shape
            raise ConfigError(
                f"tensor {task.name!r} ({m}×{n}) needs {_mib(held + row_bytes)} to factorize in one piece "
                f"(θ*, v_t and the SVD workspace: {TWIN_MATRIX_COPIES} float32 copies of the matrix plus 4·min(m, n)²), "
                f"but memory_budget less process_reserve leaves {_mib(budget)}; raise memory_budget to at least "
                f"{held + row_bytes + reserve} (bytes), or exclude the tensor (it is then copied from the base, "
                "without factors)")
        return max(1, min(task.shape[0] if task.shape else 1, (budget - held) // row_bytes))

    def tensor_memory(self, task, options: TwinOptions, budget: int) -> int:
        if task.action == "merge":
            return tensor_memory(task, options.uses_base, budget)[0]
        return itemsize(task.inputs[0].dtype) * task.chunk_rows * row_elements(task.shape) * 2

    def summary(self, plan) -> dict:
        experts = [i.url for i in plan.inputs if i.role != "base"]
        return {"experts": dict(zip(plan.method.experts, experts)),
                "largest_matrix_bytes": max((held_matrix_bytes(t.shape) for t in plan.tensors if t.action == "merge"),
                                            default=0)}

    # --- run and publish ----------------------------------------------------------------------
    def prepass(self, options: TwinOptions, plan, run_scans, saved):
        return _registry().method_of(options.shared).prepass(options.shared, plan, run_scans, saved)

    def shard_body(self, spec) -> TwinBody:
        return TwinBody(_registry().method_of(spec.method.shared), spec)

    def publish_inputs(self, plan):
        return twin_publish.module_kinds(plan)

    def publish(self, plan, results, prepared):
        return twin_publish.publish(plan, results, prepared)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


TWIN = TwinMethod(name="twin", parameters=TwinParameters, model_parameters=MethodParameters,
                  output_dir=twin_publish.SHARED_DIR, per_tensor_parameters=False)
