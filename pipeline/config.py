"""The merge config: mergekit's YAML format plus mergefleet's optional keys, validated once.

An existing mergekit config for linear, task_arithmetic or ties works unchanged. Unknown keys
are an error naming the key. Models are frozen pydantic models; derived defaults live in
``resolve_method`` (and ``shared_merge_config`` for Twin-Merging) rather than in scattered fallbacks.

``merge_method: twin`` takes its shared merge as a nested config under ``parameters.shared``
(``{merge_method, parameters}``, default task arithmetic with λ = 0.29) plus the compression keys
``rank`` | ``rank_ratio`` | ``energy`` and ``svd``; per-model weights and densities feed the shared merge.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.methods import MethodOptions
from workers.tensor_io import DTYPE_ALIASES

DEFAULT_DENSITY = 0.2  # SPEC.md: TIES keeps the top 20 % (mergekit's own default is 1.0: set it to match)
DEFAULT_MEMORY_BUDGET = 4 * 1024**3
DEFAULT_PROCESS_RESERVE = "512MiB"  # a CPU worker with Python, torch, Ray and the compiled kernels: 0.2-0.5 GB
DEFAULT_SHARD_BYTES = 1024**3
TWIN_SHARED_LAMBDA = 0.29  # SPEC.md (Twin-Merging paper): λ of the task-arithmetic shared expert
TWIN_DEFAULT_RANK_RATIO = 0.1  # SPEC.md: the paper's default rank as a fraction of min(m, n)
TWIN_KEYS = ("shared", "rank", "rank_ratio", "energy", "svd")  # parameters only merge_method: twin takes


class ConfigError(ValueError):
    """The config is invalid; the message names the key and the fix."""


def parse_bytes(value: Union[int, str]) -> int:
    """'4GB', '512MiB', '1e9' or an int -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 4GB or 512MiB")
    number, unit, binary = match.groups()
    exponent = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** exponent)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ModelParameters(_Frozen):
    weight: float | None = None  # the model's weight in the merge (default 1.0)
    density: float | None = Field(default=None, gt=0, le=1)  # TIES: fraction of |τ| kept

    @field_validator("weight", "density", mode="before")
    @classmethod
    def _scalar(cls, value):
        if isinstance(value, (list, dict)):
            raise ValueError("gradient or filtered parameters (lists) are not supported; give one number")
        return value


class ModelEntry(_Frozen):
    model: str  # local directory or fsspec URL of a Hugging Face safetensors layout
    parameters: ModelParameters = ModelParameters()


class MergeParameters(_Frozen):
    weight: float | None = None  # default weight for every model
    density: float | None = Field(default=None, gt=0, le=1)  # default TIES density for every model
    normalize: bool | None = None  # divide by Σ weights (linear, ties: true; task_arithmetic: false)
    lam: float | None = Field(default=None, alias="lambda")  # λ on the merged task vector (default 1.0)
    int8_mask: bool | None = None  # mergekit memory option; accepted, no effect (masks here are never materialised)
    trim_scope: Literal["tensor", "global"] = "tensor"  # TIES threshold per tensor (mergekit) or per model (paper)
    sign_method: Literal["sum", "count"] = "sum"  # TIES sign election by mass or by count
    zero_sign: Literal["positive", "majority"] | None = None  # sign where the vote is 0 (tensor: positive, global: majority)
    # Twin-Merging only (merge_method: twin)
    shared: SharedMerge | None = None  # the merge that makes the shared expert θ* (default task_arithmetic, λ 0.29)
    rank: int | None = Field(default=None, ge=1)  # fixed truncation rank of every 2-D exclusive tensor (capped at min(m, n))
    rank_ratio: float | None = Field(default=None, gt=0, le=1)  # rank = max(1, int(ratio·min(m, n))) (default 0.1)
    energy: float | None = Field(default=None, gt=0, le=1)  # smallest rank keeping this fraction of ‖v‖²_F
    svd: Literal["auto", "exact", "randomized"] | None = None  # SVD algorithm (default auto: randomized for large matrices)


class SharedMerge(_Frozen):
    """Twin-Merging's shared expert: a plain merge of the same models, as a nested config."""

    merge_method: Literal["linear", "task_arithmetic", "ties"] = "task_arithmetic"  # the merge that makes θ*
    parameters: MergeParameters = Field(default_factory=lambda: MergeParameters())  # its parameters (task_arithmetic: λ defaults to 0.29 here)


MergeParameters.model_rebuild()


class MergeConfig(_Frozen):
    merge_method: Literal["linear", "task_arithmetic", "ties", "twin"]  # the algorithm, as in mergekit (+ twin)
    models: tuple[ModelEntry, ...]  # experts (linear: every model averaged); at least one
    base_model: str | None = None  # θ₀; required for task_arithmetic and ties
    parameters: MergeParameters = MergeParameters()
    dtype: str | None = None  # output dtype (computation is always float32); default: the base's dtype
    out_dtype: str | None = None  # output dtype, overrides dtype
    output: str | None = None  # output URL (local dir, file://, s3://, gs://); --output overrides
    exclude: tuple[str, ...] = ()  # regexes of tensor names copied from the base unmerged
    shards: Union[int, str, None] = None  # number of output shards (int) or target bytes per shard ("2GB")
    memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET  # anonymous memory per shard task, its process included
    process_reserve: Union[int, str] = DEFAULT_PROCESS_RESERVE  # part of memory_budget the worker process itself holds
    nan_policy: Literal["error", "allow"] = "error"  # NaN / Inf in a merged input: fail naming it, or merge anyway
    storage: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)  # fsspec storage options (endpoint_url, key, secret, client_kwargs, ...) over the environment's (AWS_*, FSSPEC_S3_*); never dumped, hashed or logged

    @field_validator("models")
    @classmethod
    def _some_models(cls, models):
        if not models:
            raise ValueError("list at least one model")
        return models

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value):
        if value is not None and value not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {value!r}; use one of {sorted(DTYPE_ALIASES)}")
        return value

    @field_validator("exclude")
    @classmethod
    def _regex(cls, patterns):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"exclude pattern {p!r} is not a regex: {exc}") from exc
        return patterns

    @field_validator("shards")
    @classmethod
    def _shards(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("shards must be >= 1 (a count) or a size like '2GB'")
        if isinstance(value, str):
            parse_bytes(value)
        return value

    @model_validator(mode="after")
    def _budget_above_reserve(self):
        budget, reserve = parse_bytes(self.memory_budget), parse_bytes(self.process_reserve)
        if budget <= reserve:
            raise ValueError(f"memory_budget ({self.memory_budget}) must exceed process_reserve ({self.process_reserve}), "
                             "the memory a worker process holds before any tensor; raise memory_budget")
        return self

    @model_validator(mode="after")
    def _twin_parameters(self):
        p = self.parameters
        given = [k for k in TWIN_KEYS if getattr(p, k) is not None]
        if self.merge_method != "twin":
            if given:
                raise ValueError(f"parameters.{given[0]} is a Twin-Merging option; it needs merge_method: twin")
            return self
        defaults = type(p).model_fields
        merge_keys = sorted(k for k in p.model_fields_set - set(TWIN_KEYS) if getattr(p, k) != defaults[k].default)
        if merge_keys:
            alias = {"lam": "lambda"}.get(merge_keys[0], merge_keys[0])
            raise ValueError(f"parameters.{alias} of a twin run belongs to its shared merge; "
                             f"move it to parameters.shared.parameters.{alias}")
        if p.shared is not None:
            nested = [k for k in TWIN_KEYS if getattr(p.shared.parameters, k) is not None]
            if nested:
                raise ValueError(f"parameters.shared.parameters.{nested[0]} is a Twin-Merging option; "
                                 f"give it as parameters.{nested[0]} (the shared merge is a plain merge)")
        rules = [k for k in ("rank", "rank_ratio", "energy") if getattr(p, k) is not None]
        if len(rules) > 1:
            raise ValueError(f"parameters {' and '.join(rules)} both set the twin rank; give one of rank, rank_ratio, energy")
        return self

    @property
    def output_dtype(self) -> str | None:
        """The safetensors dtype name of the output, or None to keep each tensor's base dtype."""
        name = self.out_dtype or self.dtype
        return DTYPE_ALIASES[name] if name else None

    @property
    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)

    @property
    def process_reserve_bytes(self) -> int:
        return parse_bytes(self.process_reserve)

    @property
    def chunk_budget_bytes(self) -> int:
        """What a task's tensor chunks may hold at once: the budget less the process's own memory."""
        return self.memory_budget_bytes - self.process_reserve_bytes

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the validated config (output location excluded)."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"output"})
        for key in TWIN_KEYS:  # unset twin keys stay out, so other methods' hashes do not change
            if data["parameters"].get(key) is None:
                data["parameters"].pop(key, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resolve_method(config: MergeConfig) -> MethodOptions:
    """Fill every method default (mergekit's where it has one, SPEC.md's otherwise)."""
    if config.merge_method == "twin":
        shared = shared_merge_config(config)
        if shared.merge_method != "linear" and not config.base_model:
            raise ConfigError(f"merge_method twin with a {shared.merge_method} shared merge needs base_model: "
                              "the pre-trained model the experts were tuned from")
        return resolve_method(shared)
    p = config.parameters
    method = config.merge_method
    if method != "linear" and not config.base_model:
        raise ConfigError(f"merge_method {method} needs base_model: the pre-trained model the experts were tuned from")
    if method == "linear" and config.base_model and config.base_model not in {m.model for m in config.models}:
        raise ConfigError(
            f"linear averages the listed models; base_model {config.base_model!r} is not among them and has no weight. "
            "List it under models: with a weight, or drop base_model"
        )
    weights, densities = [], []
    for m in config.models:
        weight = _first(m.parameters.weight, p.weight, 1.0)
        density = _first(m.parameters.density, p.density, DEFAULT_DENSITY) if method == "ties" else 1.0
        weights.append(weight)
        densities.append(density)
    normalize = _first(p.normalize, method != "task_arithmetic")
    if normalize and method != "ties" and sum(weights) == 0:
        raise ConfigError("the model weights sum to 0, so normalize cannot divide by them; set normalize: false or change a weight")
    zero_sign = _first(p.zero_sign, "majority" if p.trim_scope == "global" else "positive")
    return MethodOptions(method=method, weights=tuple(weights), densities=tuple(densities), lam=_first(p.lam, 1.0),
                         normalize=normalize, trim_scope=p.trim_scope, sign_method=p.sign_method, zero_sign=zero_sign)


def shared_merge_config(config: MergeConfig) -> MergeConfig:
    """The plain merge config whose output is a twin run's shared expert θ*: the same models, base,
    dtype, exclude, shards and memory budget, with ``parameters.shared``'s method and parameters
    (task arithmetic: λ = 0.29 unless given). A linear shared merge takes no base model."""
    if config.merge_method != "twin":
        raise ConfigError(f"merge_method {config.merge_method} has no shared merge; only twin does")
    shared = config.parameters.shared or SharedMerge()
    parameters = shared.parameters
    if shared.merge_method == "task_arithmetic" and parameters.lam is None:
        parameters = parameters.model_copy(update={"lam": TWIN_SHARED_LAMBDA})
    return config.model_copy(update={"merge_method": shared.merge_method, "parameters": parameters,
                                     "base_model": config.base_model if shared.merge_method != "linear" else None})


def _first(*values):
    return next(v for v in values if v is not None)


def load_config(source: Union[str, Path, dict[str, Any]]) -> MergeConfig:
    """Parse and validate a config from a YAML path, YAML text or a dict; errors name the key."""
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        is_path = _looks_like_path(source)
        where = str(source) if is_path else "config text"
        try:
            text = Path(source).read_text() if is_path else source
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None
    resolve_method(config)
    return config


def _looks_like_path(source: Union[str, Path]) -> bool:
    """A Path, a *.yaml / *.yml name, or an existing file (anything else is YAML text)."""
    if isinstance(source, Path):
        return True
    if "\n" in source:
        return False
    if source.endswith((".yaml", ".yml")):
        return True
    try:
        return Path(source).is_file()
    except OSError:  # e.g. a name too long for the filesystem: it is text
        return False


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if not key:  # a check across keys (model validator): the message names them
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r} (see the config reference in README.md)"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"{key}: {error['msg']}"
